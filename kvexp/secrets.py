"""Credentials: kept out of the tracking URI, and masked in everything kvexp writes or prints.

A password typed into tracking.uri=http://user:pw@host would be written out by Hydra itself (multirun.yaml,
.hydra/*.yaml) before any job runs, and printed by MLflow in its run links. So kvexp.run moves it into MLflow's
own variables (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD) before Hydra reads the command line, and
preflight refuses credentials that reach tracking.uri any other way (a config file). scrub() masks what is left,
in each form it can take: as given, percent-encoded, and as Hydra escapes it (`http\\://alice\\:pw@`).
"""
from __future__ import annotations

import os
import re
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from kvexp.errors import ConfigError

# `scheme://userinfo@`, also in Hydra's escaped form `scheme\://user\:pw@`
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*\\?://)[^/?#@\s]+@")
_SECRET_NAME = re.compile(r"(^|_)(TOKEN|PASSWORD|PASSWD|SECRET|API_?KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIALS?|"
                          r"CONNECTION_STRING)(_|$)", re.IGNORECASE)
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}")
_HYDRA_SPECIAL = re.compile(r"([\\()\[\]{}:=, \t])")  # what Hydra escapes when it writes an override back out
MIN_SECRET_LEN = 8  # shorter values of such variables are flags ("1", "false"), and masking them would mangle text
MASK = "***"
URI_KEY = "tracking.uri"
USER_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
HTTP = ("http", "https")


def redact_uri(text: str) -> str:
    """Mask the user:password@ part of every URI in text: postgresql://u:pw@db/x -> postgresql://***@db/x."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)


def _forms(secret: str) -> set[str]:
    """The ways a secret appears in text: as is, percent-encoded (in a URI), escaped by Hydra."""
    return {secret, quote(secret, safe=""), _HYDRA_SPECIAL.sub(r"\\\1", secret)}


def env_secrets() -> list[str]:
    """Values of credential-like environment variables (HF_TOKEN, MLFLOW_TRACKING_PASSWORD, AWS_SECRET_ACCESS_KEY),
    each in every form it takes in text, longest first: one secret may contain another."""
    # Names first, then .get(): MLflow's telemetry thread deletes variables, and os.environ.items() would then
    # raise KeyError mid-iteration (list(os.environ) is atomic).
    names = [k for k in list(os.environ) if _SECRET_NAME.search(k)]
    values = {v for k in names if len(v := os.environ.get(k) or "") >= MIN_SECRET_LEN}
    return sorted({form for v in values for form in _forms(v)}, key=len, reverse=True)


def scrub(text: str) -> str:
    """text with URI credentials, Hugging Face tokens and the values of credential variables masked."""
    text = _HF_TOKEN.sub(MASK, redact_uri(text))
    for secret in env_secrets():
        text = text.replace(secret, MASK)
    return text


def _unhydra(value: str) -> tuple[str, str]:
    """(the URI in a Hydra override value, the quote it was in): 'http\\://a\\:b@h' -> ("http://a:b@h", "'")."""
    quote_char = value[0] if len(value) > 1 and value[0] == value[-1] and value[0] in "'\"" else ""
    if quote_char:
        value = value[1:-1]
    return re.sub(r"\\(.)", r"\1", value), quote_char


def _move_userinfo(value: str) -> str:
    """An http(s) URI without its user:password@, which go to MLflow's variables (percent-decoded), for this
    process and the jobs it starts. Other schemes stay as they are: check_uri refuses their passwords."""
    uri, quote_char = _unhydra(value)
    parts = urlsplit(uri)
    if parts.scheme not in HTTP or "@" not in parts.netloc:
        return value
    userinfo, _, host = parts.netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    os.environ[USER_ENV] = unquote(user)
    if colon:
        os.environ[PASSWORD_ENV] = unquote(password)
    return quote_char + urlunsplit(parts._replace(netloc=host)) + quote_char


def take_uri_credentials(argv: list[str]) -> list[str]:
    """argv with the credentials of a tracking.uri=http(s)://user:password@host override moved out (_move_userinfo).
    Call it before Hydra reads the command line: Hydra writes the overrides to disk itself."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        out.append(f"{key}={_move_userinfo(value)}" if eq and key.lstrip("+~") == URI_KEY else arg)
    return out


def check_uri(uri: str | None) -> None:
    """Refuse a tracking URI that still carries a password (or, for a server, any userinfo): it came from a config
    file, which Hydra copies into every job's output directory."""
    if not uri:
        return
    parts = urlsplit(uri)
    if parts.scheme in HTTP and "@" in parts.netloc:
        raise ConfigError(f"{URI_KEY}={redact_uri(uri)}: credentials in a config file's URI are copied into every "
                          f"job's output; set {USER_ENV} and {PASSWORD_ENV} instead (or pass them in "
                          f"{URI_KEY}= on the command line, which kvexp moves into those variables)")
    if parts.password is not None:
        raise ConfigError(f"{URI_KEY}={redact_uri(uri)}: a password in a database URI is written out with the "
                          "config; drop it from the URI and use the database's own way (PGPASSWORD or ~/.pgpass for "
                          "postgresql, MYSQL_PWD or ~/.my.cnf for mysql)")
