"""Errors a user can fix. Entry points print them as one line (no traceback) and exit non-zero."""


class KvexpError(Exception):
    """Base class: the message is a complete, one-line instruction for the user."""


class ConfigError(KvexpError):
    """A config value is invalid; the message names the field and the allowed values."""


class UnsupportedConfig(ConfigError):
    """A valid config that the chosen engine, device or installed library cannot run."""


class MissingDependency(KvexpError):
    """An optional dependency (tensorrt_llm, a GPU) is missing; the message says how to get it."""
