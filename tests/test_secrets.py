"""Credentials from the environment or the config never reach a param, a tag or an artifact of the store.

Every value kvexp sends to MLflow passes tracking.scrub(); these tests feed it secrets through each way in and
then read the store's raw bytes (the sqlite file holds every param, tag and metric; artifacts are files).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvexp.errors import ConfigError
from kvexp.secrets import PASSWORD_ENV, USER_ENV, check_uri, take_uri_credentials
from kvexp.tracking import TAG, Tracker, redact_uri, scrub

HF = "hf_kvexpSecretsTest0123456789abcdefgh"
ENV = {"HF_TOKEN": HF, "HUGGING_FACE_HUB_TOKEN": HF, "MLFLOW_TRACKING_PASSWORD": "mlflow-pw-0123456789",
       "AWS_SECRET_ACCESS_KEY": "aws/Secret+Key0123456789"}


def leaks(root: Path, secrets) -> list[str]:
    """Files under root (the store: sqlite file and artifacts) whose bytes hold any of the secrets."""
    files = [p for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files)
    return [f"{p.relative_to(root)}: {s}" for p in files for s in secrets if s.encode() in p.read_bytes()]


@pytest.mark.parametrize("text, expected", [
    ("postgresql://kvexp:pw@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
    ("postgresql+psycopg2://kvexp:p%40ss@db/mlflow", "postgresql+psycopg2://***@db/mlflow"),
    ("tracking.uri=https://token@mlflow.example.com/ -m", "tracking.uri=https://***@mlflow.example.com/ -m"),
    ("two: http://a:b@h1:1 and s3://key:secret@bucket/x", "two: http://***@h1:1 and s3://***@bucket/x"),
    ("sqlite:////home/me/mlruns/mlflow.db", "sqlite:////home/me/mlruns/mlflow.db"),  # nothing to mask
    ("http://127.0.0.1:5000/#/experiments/1", "http://127.0.0.1:5000/#/experiments/1"),
    ("model.path=/data/ckpt@v2", "model.path=/data/ckpt@v2"),  # an @ in a path is not userinfo
    (r"tracking.uri=http\://alice\:pw@127.0.0.1\:5000", r"tracking.uri=http\://***@127.0.0.1\:5000"),  # Hydra's
])
def test_redact_uri_masks_userinfo_only(text, expected):
    assert redact_uri(text) == expected


def test_scrub_masks_credential_variables_and_hf_tokens_not_flags(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_API_KEY", "key-0123456789")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "tokenizers-false")  # TOKEN inside a word: not a credential
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")  # a flag: too short to be a secret
    text = "key-0123456789 tokenizers-false 1 hf_Unknown0123456789abcdefghij"
    assert scrub(text) == "*** tokenizers-false 1 ***"


def test_scrub_masks_a_secret_in_each_form_it_takes(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "p@ss:w/rd,0123")
    text = r"p@ss:w/rd,0123 | p%40ss%3Aw%2Frd%2C0123 | p@ss\:w/rd\,0123"  # as is, percent-encoded, escaped by Hydra
    assert scrub(text) == "*** | *** | ***"


@pytest.mark.parametrize("arg, expected, user, password", [
    ("tracking.uri=http://alice:s3cret@127.0.0.1:5000", "tracking.uri=http://127.0.0.1:5000", "alice", "s3cret"),
    ("+tracking.uri=https://bob:p%40ss%2Fw@mlflow.example.com/x", "+tracking.uri=https://mlflow.example.com/x", "bob",
     "p@ss/w"),  # percent-encoded in the URI: MLflow's variable gets the password itself
    (r"tracking.uri=http\://carol\:pw@[::1]\:80", "tracking.uri=http://[::1]:80", "carol", "pw"),  # escaped
    ("tracking.uri='https://token@h/'", "tracking.uri='https://h/'", "token", None),  # quoted; a user name only
    ("tracking.uri=http://127.0.0.1:5000", "tracking.uri=http://127.0.0.1:5000", None, None),
    ("tracking.uri=postgresql://u:pw@db/x", "tracking.uri=postgresql://u:pw@db/x", None, None),  # check_uri's
    ("model.path=http://u:pw@host/ckpt", "model.path=http://u:pw@host/ckpt", None, None),  # not the tracking URI
])
def test_uri_credentials_leave_the_command_line_for_mlflows_variables(arg, expected, user, password, monkeypatch):
    monkeypatch.delenv(USER_ENV, raising=False)
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    assert take_uri_credentials(["-m", arg, "quant=fp16"]) == ["-m", expected, "quant=fp16"]
    assert (os.environ.get(USER_ENV), os.environ.get(PASSWORD_ENV)) == (user, password)


@pytest.mark.parametrize("uri, pattern", [
    ("http://alice:s3cret@127.0.0.1:5000", "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead"),
    ("postgresql://kvexp:s3cret@db/mlflow", "PGPASSWORD or ~/.pgpass"),
])
def test_credentials_left_in_the_tracking_uri_are_refused(uri, pattern):
    with pytest.raises(ConfigError, match=pattern) as e:
        check_uri(uri)
    assert "s3cret" not in str(e.value) and str(e.value).startswith("tracking.uri=")
    check_uri("postgresql://kvexp@db/mlflow")  # a user name alone, as in the README's server: no secret


def test_every_way_into_the_store_is_scrubbed(tmp_path, monkeypatch):
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    uri = "postgresql://kvexp:db-password-123@db.internal/mlflow"
    tracker = Tracker(f"sqlite:///{tmp_path}/mlruns/mlflow.db", "kvexp")
    run_id = tracker.start_run("r", {TAG + "command": f"tracking.uri={uri}"})
    tracker.log_params(run_id, {"tracking.uri": uri, "model.revision": HF})
    tracker.set_tags(run_id, {TAG + "note": ENV["AWS_SECRET_ACCESS_KEY"]})
    tracker.log_text(run_id, f"tracking:\n  uri: {uri}\n", "config.yaml")
    results = tmp_path / "lm_eval"
    results.mkdir()
    (results / "results.json").write_text(f'{{"token": "{HF}", "pw": "{ENV["MLFLOW_TRACKING_PASSWORD"]}"}}')
    tracker.log_artifact(run_id, results, "lm_eval")
    tracker.fail(run_id, ConnectionError(f"cannot reach {uri} with {HF}"))
    assert leaks(tmp_path / "mlruns", [*ENV.values(), "db-password-123"]) == []
    run = tracker.client.get_run(run_id)  # logged, masked: not dropped
    assert run.data.params == {"tracking.uri": "postgresql://***@db.internal/mlflow", "model.revision": "***"}
    assert run.data.tags[TAG + "error"] == "ConnectionError: cannot reach postgresql://***@db.internal/mlflow with ***"
    assert run.info.status == "FAILED"


@pytest.mark.slow
def test_a_smoke_job_with_tokens_in_its_environment_logs_none(tmp_path):
    args = ["experiment=smoke", "eval.limit=1", "eval.fidelity.enabled=false", "bench.iters=1", "bench.warmup=0"]
    proc = subprocess.run([sys.executable, "-m", "kvexp.run", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=os.environ | ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = {p.name for p in (tmp_path / "mlruns").rglob("*")}
    assert {"config.yaml", "overrides.txt", "lm_eval_results.json"} <= names  # lm-eval's own output is scanned too
    assert leaks(tmp_path / "mlruns", ENV.values()) == []
