"""A composed config -> a validated RunSpec: its fields checked, its BuildSpec resolved, its run hash computed.

Every `auto` is resolved here, once, for every stage of the job (the engine, the fidelity reference, the
benchmark): the device, the compute dtype, the decode attention that serves the KV format. The model is named
by what it is (a local checkpoint's file contents, a Hub id's resolved commit, a builtin's recipe version) and
calibration data by the digest of its source, so a "FINISHED, skip" means the same experiment on the same kind
of machine. Nothing is downloaded or built; a Hub model is asked of the Hub (or the local cache offline).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import platform
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from kvexp import artifacts, checkpoint, organism
from kvexp.bench.profile import require_tool
from kvexp.config import CalibConfig, KvexpConfig, QuantConfig, RunSpec, check_fields, resolve_cache_dir
from kvexp.core.spec import NUMERICS_VERSION, BuildSpec, KVFormatSpec, WeightFormat
from kvexp.engines import engine_class
from kvexp.errors import ConfigError, UnsupportedConfig
from kvexp.evaluate.accuracy import check_tasks
from kvexp.quant.calib import BUILTIN, HUB_DATASETS, check_calib, needs_calib

DEVICE_HELP = "engine.device={}: no CUDA GPU is visible here; use engine.device=auto or cpu"
VERSIONED = ("torch", "triton", "transformers", "nvidia-modelopt", "tensorrt-llm")  # what computes the numbers


def validate(cfg: DictConfig | KvexpConfig) -> RunSpec:
    """Check every user-facing value and resolve the build before anything is downloaded or built."""
    data = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dataclasses.asdict(cfg)
    check_fields(data)
    engine_cfg = dict(data["engine"])
    cls = engine_class(engine_cfg.get("name"))
    options = cls.parse_options(engine_cfg)
    typed: KvexpConfig = OmegaConf.to_object(cfg) if OmegaConf.is_config(cfg) else cfg
    build = build_spec(typed, options, cls)
    spec = RunSpec(cfg=typed, engine_options=options, build=build, config_hash=run_hash(typed, build))
    cls.check_supported(spec)
    if typed.bench.profile in ("ncu", "nsys"):  # which engines may profile is a capability (check_supported)
        require_tool(typed.bench.profile)
    checkpoint.check_model(spec)
    check_tasks(typed.eval)
    return spec


def build_spec(cfg: KvexpConfig, options, cls=None) -> BuildSpec:
    """The BuildSpec of cfg on engine class cls (cfg.engine's by default) with its options."""
    cls = cls or engine_class(options.name)
    model_dir = checkpoint.check_path(cfg.model.path)
    device = resolve_device(getattr(options, "device", "auto"))
    dtype = resolve_dtype(cfg.model.dtype, device)
    q, cache_dir = cfg.quant, resolve_cache_dir(cfg.cache_dir)
    kv = KVFormatSpec(q.kv_cache.dtype, q.kv_cache.scale, q.kv_cache.granularity)
    options = cls.resolve_options(options, cfg, device, dtype)
    resolved = dataclasses.asdict(options) | ({"device": str(device)} if hasattr(options, "device") else {})
    return BuildSpec(
        engine=options.name, model=cfg.model.path,
        model_fingerprint=checkpoint.model_fingerprint(cfg.model.path, cfg.model.revision, cache_dir),
        model_dir=None if model_dir is None else str(model_dir), device=str(device), device_name=device_name(device),
        dtype=str(dtype).removeprefix("torch."),
        weights=WeightFormat(q.weights.dtype, q.weights.algo, q.weights.group_size, q.weights.lm_head,
                             q.activations.dtype, q.activations.scale),
        kv=kv, attention=cls.attention_impl(kv, device, dtype, options),
        calib=calib_spec(q, cache_dir) if needs_calib(q) else None, options=resolved,
        versions=library_versions())


def run_hash(cfg: KvexpConfig, build: BuildSpec) -> str:
    """sha256 of what determines a run's numbers: the BuildSpec (labels and local paths aside), the context,
    eval, bench and seed settings, and kvexp's numerics version. Key order and composition route do not count."""
    ev = dataclasses.asdict(cfg.eval)
    ev.pop("name")
    if not ev["limits"]:
        ev.pop("limits")  # the hash of a run without per-task limits is what it was before they existed
    bench = dataclasses.asdict(cfg.bench)
    bench.pop("name")
    return artifacts.digest({"build": build.identity, "context": [cfg.context.prompt_len, cfg.context.gen_len],
                             "eval": ev, "bench": bench, "seed": cfg.seed, "numerics": NUMERICS_VERSION})


def reference_spec(spec: RunSpec) -> RunSpec:
    """The unquantized run the fidelity metrics compare against: same model, engine, device, dtype and context."""
    cfg = dataclasses.replace(spec.cfg, quant=QuantConfig(name="fp16"))
    cls = engine_class(spec.engine_options.name)
    build = spec.build.unquantized(cls.attention_impl(KVFormatSpec("auto", "dynamic", "token"),
                                                      spec.build.torch_device, spec.build.torch_dtype,
                                                      spec.engine_options))
    return dataclasses.replace(spec, cfg=cfg, build=build, config_hash=run_hash(cfg, build))


# ---- the machine ----
def resolve_device(requested: str) -> torch.device:
    """auto -> the first CUDA GPU if any, else the CPU; cuda means cuda:<current device>."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UnsupportedConfig(DEVICE_HELP.format(requested))
        index = torch.device(requested).index
        return torch.device("cuda", torch.cuda.current_device() if index is None else index)
    return torch.device(requested)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto -> bfloat16 on GPUs that have it, float16 on older ones (T4), float32 on the CPU."""
    if name != "auto":
        return getattr(torch, name)
    if device.type != "cuda":
        return torch.float32  # CPU half-precision matmuls are slow and not what anyone deploys
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def device_name(device: torch.device) -> str:
    """The kind of machine a timing belongs to: the GPU's name, or the CPU's model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"cpu ({model}, {os.cpu_count()} cores)"


@functools.lru_cache(maxsize=None)
def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in VERSIONED:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


# ---- calibration ----
def calib_spec(q: QuantConfig, cache_dir: Path) -> dict:
    """What the calibration windows are cut from and how; the source checked (a local file: readable UTF-8 text)
    only where the run calibrates, since an fp16 run never reads it."""
    check_calib(q.calib)
    return {"source": calib_source(q.calib, cache_dir), "num_samples": q.calib.num_samples,
            "seq_len": q.calib.seq_len}


def calib_source(calib: CalibConfig, cache_dir) -> str:
    """What the calibration text is: the digest of a local file's or the shipped corpus's bytes, the organism's
    recipe, or a Hub dataset at its resolved commit."""
    name = calib.dataset
    if name == "builtin":
        return "sha256:" + artifacts.file_sha256(BUILTIN)
    if name == "organism":
        return f"organism@{organism.VERSION_TAG}"
    if name in HUB_DATASETS:
        return f"hub:{HUB_DATASETS[name][0]}@{_dataset_commit(name)}"
    return "sha256:" + artifacts.fingerprint([Path(name).expanduser()], cache_dir / "fingerprints")


def _dataset_commit(name: str) -> Optional[str]:
    """The Hub dataset's current commit; offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) the name alone, since the
    datasets library then reads whatever its local cache holds."""
    if any(os.environ.get(v, "0").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return "local-cache"
    from huggingface_hub import HfApi

    repo = HUB_DATASETS[name][0][0]
    try:
        return HfApi().dataset_info(repo, timeout=15).sha
    except Exception as e:  # only "unreachable" is the user's to fix
        if not checkpoint.unreachable(e):
            raise
        raise ConfigError(f"quant.calib.dataset={name}: could not reach {repo} on the Hugging Face Hub "
                          f"({type(e).__name__}); use quant.calib.dataset=builtin or a local .txt/.jsonl file "
                          "offline") from e
