"""The config schema (one dataclass per Hydra group), the checks of its fields, and the RunSpec.

Defaults live here, in the dataclasses; the YAML presets under conf/ only set what differs. check_fields raises
ConfigError with one line that names the field and the allowed values; kvexp.resolve turns a checked config into
a RunSpec (the BuildSpec resolved, the run hash computed).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from kvexp import organism
from kvexp.core.spec import BuildSpec
from kvexp.errors import ConfigError


@dataclass
class ModelConfig:
    name: str = "tiny"
    # A Hub id, a local HF checkpoint dir, or "builtin:<name>" (created offline on first use).
    path: str = "builtin:tiny"
    revision: Optional[str] = None
    # Activation/compute dtype; auto = bfloat16 on CUDA with bf16, float16 on older CUDA, float32 on CPU.
    dtype: str = "auto"


@dataclass
class WeightQuantConfig:
    dtype: str = "auto"  # auto (the model dtype, unquantized) | int4 | fp8
    algo: str = "none"  # none | awq | rtn
    group_size: int = 128
    lm_head: str = "bf16"  # bf16 (the model dtype, unquantized) | int8 | int4: round-to-nearest, groups of group_size


@dataclass
class KVQuantConfig:
    dtype: str = "auto"  # auto (the model dtype) | int8 | fp8 | int4
    scale: str = "dynamic"  # dynamic (computed at write) | static (calibrated once)
    granularity: str = "token"  # token (per token and head) | head | tensor


@dataclass
class ActivationQuantConfig:
    # The linears' inputs: auto (the model dtype) | fp8 (e4m3, needs quant.weights.dtype=fp8: W8A8).
    dtype: str = "auto"
    scale: str = "dynamic"  # dynamic (per token, at run time) | static (one calibrated scale per linear, ModelOpt)


@dataclass
class CalibConfig:
    # "builtin" (text shipped with kvexp, offline), "organism" (builtin:organism's task documents, offline),
    # "cnn_dailymail", "wikitext", or a local .txt/.jsonl path.
    dataset: str = "cnn_dailymail"
    num_samples: int = 128
    seq_len: int = 512


@dataclass
class QuantConfig:
    name: str = "fp16"
    weights: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    kv_cache: KVQuantConfig = field(default_factory=KVQuantConfig)
    activations: ActivationQuantConfig = field(default_factory=ActivationQuantConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)


@dataclass
class ContextConfig:
    name: str = "short"
    prompt_len: int = 512  # tokens of prompt for the fidelity prompts and the benchmark
    gen_len: int = 128  # tokens generated after it


@dataclass
class FidelityConfig:
    enabled: bool = True
    num_prompts: int = 4
    score_tokens: int = 32  # teacher-forced positions scored against the fp16 reference
    gen_tokens: int = 32  # greedy tokens compared with the fp16 reference


@dataclass
class EvalConfig:
    name: str = "none"
    tasks: list = field(default_factory=list)
    limit: Optional[int] = None  # documents per task; None: all
    limits: dict[str, int] = field(default_factory=dict)  # per task, over limit (eval=default sizes each task)
    num_fewshot: int = 0
    batch_size: int = 8
    # Score continuations by decoding them against the (quantized) cache, and decode a generation's first token
    # from it too (Engine.generate_from_cache); auto = on when the KV cache is quantized. One-pass scoring never
    # reads the cache, so it hides KV quantization (DESIGN.md).
    kv_faithful: str = "auto"  # auto | on | off
    seed: int = 1234
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)


@dataclass
class BenchConfig:
    name: str = "default"
    enabled: bool = True
    batch_size: int = 1
    warmup: int = 2
    iters: int = 5
    profile: str = "none"  # none | torch | ncu | nsys: a kernel-by-kernel profile after the timings (bench/profile.py)


@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # None: sqlite:///<cwd>/mlruns/mlflow.db
    experiment: str = "kvexp"


@dataclass
class KvexpConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    # Engine options are owned by each engine (its Options dataclass); validated by validate().
    engine: Any = field(default_factory=lambda: {"name": "torch"})
    eval: EvalConfig = field(default_factory=EvalConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 0
    force: bool = False  # re-run even if a FINISHED run with this config hash exists
    cache_dir: Optional[str] = None  # None: $KVEXP_CACHE_DIR or ~/.cache/kvexp


# Keys that do not change results, left out of a run's params: where things are written, and labels.
PARAM_EXCLUDE = (
    "tracking", "force", "cache_dir", "engine.dry_run",
    "model.name", "quant.name", "context.name", "eval.name", "bench.name",
)

CHOICES = {
    "model.dtype": ("auto", "float32", "float16", "bfloat16"),
    "quant.weights.dtype": ("auto", "int4", "fp8"),
    "quant.weights.algo": ("none", "awq", "rtn"),
    "quant.weights.lm_head": ("bf16", "int8", "int4"),
    "quant.kv_cache.dtype": ("auto", "int8", "fp8", "int4"),
    "quant.kv_cache.scale": ("dynamic", "static"),
    "quant.kv_cache.granularity": ("token", "head", "tensor"),
    "quant.activations.dtype": ("auto", "fp8"),
    "quant.activations.scale": ("dynamic", "static"),
    "eval.kv_faithful": ("auto", "on", "off"),
    "bench.profile": ("none", "torch", "ncu", "nsys"),
}
POSITIVE = (
    "context.prompt_len", "context.gen_len", "quant.weights.group_size", "quant.calib.num_samples",
    "quant.calib.seq_len", "eval.batch_size", "eval.fidelity.num_prompts", "eval.fidelity.score_tokens",
    "eval.fidelity.gen_tokens", "bench.batch_size", "bench.iters",
)


@dataclass(frozen=True)
class RunSpec:
    """A validated run: the typed config, the engine's typed options, the resolved BuildSpec and the run hash
    (tagged kvexp.config_hash: the hash of the BuildSpec with the context, eval, bench and seed settings)."""
    cfg: KvexpConfig
    engine_options: Any
    build: BuildSpec
    config_hash: str

    @property
    def kv_quantized(self) -> bool:
        return self.build.kv.quantized

    @property
    def kv_faithful(self) -> bool:
        mode = self.cfg.eval.kv_faithful
        return self.kv_quantized if mode == "auto" else mode == "on"

    @property
    def cache_dir(self) -> Path:
        return resolve_cache_dir(self.cfg.cache_dir)


def resolve_cache_dir(value: Optional[str]) -> Path:
    root = value or os.environ.get("KVEXP_CACHE_DIR") or "~/.cache/kvexp"
    return Path(root).expanduser().resolve()


def _get(container: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        container = container[part]
    return container


def canonical(cfg: DictConfig | dict) -> dict:
    """The resolved config as plain data, without the keys that do not change results (what a run logs as params)."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else json.loads(json.dumps(cfg))
    for dotted in PARAM_EXCLUDE:
        *parents, leaf = dotted.split(".")
        node = data
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return data


def check_fields(data: dict) -> None:
    """Every user-facing value that can be checked without looking anything up: choices, positive integers,
    combinations of quantization settings, what the model organism can read."""
    for key, allowed in CHOICES.items():
        if _get(data, key) not in allowed:
            raise ConfigError(f"{key}={_get(data, key)}: not one of {', '.join(allowed)}")
    for key in POSITIVE:
        value = _get(data, key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{key}={value}: must be a positive integer")
    if data["bench"]["warmup"] < 0:
        raise ConfigError(f"bench.warmup={data['bench']['warmup']}: must be >= 0")
    if data["eval"]["limit"] is not None and data["eval"]["limit"] <= 0:
        raise ConfigError(f"eval.limit={data['eval']['limit']}: must be a positive integer or null")
    for task, n in data["eval"]["limits"].items():  # a task not in eval.tasks is not run: its limit does not matter
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ConfigError(f"eval.limits.{task}={n}: must be a positive integer")
    _validate_quant(data["quant"])
    _validate_organism(data)


def _validate_quant(q: dict) -> None:
    w, kv = q["weights"], q["kv_cache"]
    if (w["dtype"] == "int4") != (w["algo"] in ("awq", "rtn")):
        raise ConfigError(
            f"quant.weights: dtype={w['dtype']} with algo={w['algo']}: int4 weights need algo awq or rtn, "
            "and awq/rtn need dtype int4")
    act = q["activations"]
    if act["dtype"] == "fp8" and w["dtype"] != "fp8":
        raise ConfigError(f"quant.activations.dtype=fp8: fp8 activations need fp8 weights (the GEMM takes both in "
                          f"e4m3), and quant.weights.dtype={w['dtype']}; add quant.weights.dtype=fp8 or use quant=fp8")
    if act["dtype"] == "auto" and act["scale"] == "static":
        raise ConfigError("quant.activations.scale=static: only fp8 activations have scales; add "
                          "quant.activations.dtype=fp8 or use quant=fp8_static")
    if kv["scale"] == "dynamic" and kv["granularity"] != "token":
        raise ConfigError(
            f"quant.kv_cache.granularity={kv['granularity']}: dynamic scales are per token; "
            "use granularity=token, or scale=static for head/tensor scales")
    if kv["scale"] == "static" and kv["granularity"] == "token":
        raise ConfigError("quant.kv_cache.granularity=token: static scales are per head or per tensor; "
                          "use granularity=head|tensor, or scale=dynamic")


def _validate_organism(data: dict) -> None:
    """The organism's vocabulary is its task's words only: any other text is unknown tokens to it."""
    if not organism.is_organism(data["model"]["path"]):
        return
    q = data["quant"]
    calibrated = q["weights"]["algo"] == "awq" or q["kv_cache"]["scale"] == "static" or \
        q["activations"]["scale"] == "static"
    if calibrated and q["calib"]["dataset"] != "organism":
        raise ConfigError(f"quant.calib.dataset={q['calib']['dataset']}: the model organism reads only its own "
                          "task's words; use quant.calib.dataset=organism (experiment=organism sets it)")
    other = [t for t in data["eval"]["tasks"] if t != "kvexp_recall"]
    if other:
        raise ConfigError(f"eval.tasks: {', '.join(map(str, other))} cannot be read by the model organism, which "
                          "knows only its own task's words; use eval=organism (task kvexp_recall)")


def register_schema() -> None:
    """Make the dataclass schema the base of conf/config.yaml (its defaults list names kvexp_schema)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="kvexp_schema", node=KvexpConfig)


register_schema()
