"""Compose and validate every job of a command line before any job starts.

Hydra composes jobs one at a time, as they run; a typo in the third job of a sweep would surface only after
two models were built. Here each job's config is composed with Hydra's own compose API and validated, and any
problem becomes one line naming the field and the allowed values.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvexp import launcher
from kvexp.config import RunSpec
from kvexp.errors import ConfigError, UnsupportedConfig
from kvexp.evaluate.accuracy import check_runnable
from kvexp.resolve import validate
from kvexp.secrets import check_uri

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


@dataclass
class Plan:
    multirun: bool
    specs: list[RunSpec]
    overrides: list[list[str]]  # per job, as Hydra will apply them
    refused: list[str]  # a line per sweep cell its engine cannot run: Hydra's job skips it


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


# Hydra's flags that show something (help, the config, the search path...) instead of running a job
SHOW_FLAGS = ("help", "hydra_help", "info", "cfg", "shell_completion")


def hydra_args(argv: list[str]):
    """The command line as Hydra's own parser reads it (`--cfg job`, `-c job`, `--cfg=job`, `-m`, overrides...)."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    parser.exit_on_error = False  # kvexp reports the error in its own one line
    try:
        args, unknown = parser.parse_known_args(argv)
    except Exception as e:  # argparse's own errors: a flag without its value, an unknown --info choice
        raise ConfigError(f"could not parse the command line: {e}") from e
    if unknown:
        raise ConfigError(f"{' '.join(unknown)}: not a flag of kvexp.run; `python -m kvexp.run --help` lists them")
    return args


def shows_only(argv: list[str]) -> bool:
    """True when Hydra will only show something (--help, --cfg job, --info ...) and run no job."""
    args = hydra_args(argv)
    return any(getattr(args, flag) for flag in SHOW_FLAGS)


def _split(argv: list[str]) -> tuple[bool, list[str], list[str]]:
    """(multirun?, the job overrides, the hydra.* and hydra/<group> overrides)."""
    args = hydra_args(argv)
    hydra = [a for a in args.overrides if a.startswith("hydra")]
    return args.multirun, [a for a in args.overrides if a not in hydra], hydra


def _check_groups(overrides) -> None:
    for o in overrides:
        group = o.key_or_group
        if (CONF_DIR / group).is_dir():
            values = list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()]
            options = group_options(group)
            for v in values:
                if v is not None and str(v) not in options:
                    raise ConfigError(f"{group}={v}: unknown option; choose one of {', '.join(options)}")


def _one_line(exc: Exception) -> str:
    """Hydra/OmegaConf errors span several lines; keep the key, the value and the first sentence."""
    cause = exc.__cause__ or exc
    key = getattr(cause, "full_key", None)
    first = str(getattr(cause, "msg", None) or cause).splitlines()[0] if str(cause) else type(cause).__name__
    if key and "not in" in first:
        return f"{key}: unknown field ({first}); see conf/ for the fields of each group"
    if key:
        value = getattr(cause, "value", None)
        return f"{key}={value}: {first}"
    return " ".join(str(exc).replace("Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.",
                                     "").split())


def compose_job(overrides: list[str], hydra_config: bool = False):
    """The config Hydra composes from these overrides; its errors (unknown keys, wrong types) as ConfigError."""
    from hydra import compose, initialize_config_dir

    import kvexp.config  # noqa: F401  (registers the schema)

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=overrides, return_hydra_config=hydra_config)
    except Exception as e:  # Hydra and OmegaConf raise many types; each is one line for the user
        raise ConfigError(_one_line(e)) from e


def _parse(args: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides(args)
    except Exception as e:  # Hydra's grammar errors
        raise ConfigError(f"could not parse the overrides: {_one_line(e)}") from e


def _hydra_config(parsed, hydra_args: list[str]):
    """The hydra node as Hydra's BasicSweeper reads it: composed with the command line's non-sweep overrides, its
    hydra.* ones included."""
    return compose_job([o.input_line for o in parsed if not o.is_sweep_override()] + hydra_args,
                       hydra_config=True).hydra


def _sweeper_params(hydra_cfg) -> list[str]:
    """The sweep a config declares in hydra.sweeper.params (experiment=organism does), as overrides. Hydra puts
    them before the command line's, whose values win for the same key; plan() does the same."""
    return [f"{k}={v}" for k, v in (hydra_cfg.sweeper.get("params") or {}).items()]


def plan(argv: list[str]) -> Plan:
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    multirun, args, hydra_args = _split(argv)
    parsed = _parse(args)
    _check_groups(parsed)
    hydra_cfg = None
    if multirun:
        hydra_cfg = _hydra_config(parsed, hydra_args)
        declared = _sweeper_params(hydra_cfg)
        declared_parsed = _parse(declared)
        _check_groups(declared_parsed)
        args, parsed = declared + args, declared_parsed + parsed
    if not multirun and any(o.is_sweep_override() for o in parsed):
        raise ConfigError("a sweep (a=x,y) needs multirun: add -m, e.g. python -m kvexp.run -m quant=fp16,int8kv")
    jobs = BasicSweeper.split_arguments(parsed, None)[0] if multirun else [args]
    configs = [compose_job(job) for job in jobs]
    if hydra_cfg is not None:  # a launcher runs the jobs of -m only
        launcher.check(hydra_cfg.launcher, configs)
    swept = {o.key_or_group for o in parsed if o.is_sweep_override()}
    specs, overrides, refused = [], [], []
    for job, cfg in zip(jobs, configs):
        try:
            spec = validate(cfg)
        except UnsupportedConfig as e:  # what this engine or machine cannot run: the sweep's other cells still can
            if not multirun:
                raise
            refused.append((" ".join(o for o in job if o.split("=", 1)[0] in swept), e))
            continue
        check_runnable(spec)
        specs.append(spec)
        overrides.append(list(job))
    if not specs:
        raise refused[0][1]
    stores = {(s.cfg.tracking.uri, s.cfg.tracking.experiment) for s in specs}
    if len(stores) > 1:
        raise ConfigError("tracking.uri / tracking.experiment: must be the same for every job of one sweep")
    check_uri(specs[0].cfg.tracking.uri)
    return Plan(multirun=multirun, specs=specs, overrides=overrides,
                refused=[f"kvexp: skip {cell}: {e}" for cell, e in refused])
