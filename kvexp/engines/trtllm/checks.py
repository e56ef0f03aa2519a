"""engine=trtllm validation: config rules (always, dry-run included) and environment rules (only when running).

Every error is one line that names the field or the missing piece and says what works instead. The environment
checks are cheap (find_spec, package metadata), never `import tensorrt_llm` (seconds of CUDA/MPI start-up).
"""
from __future__ import annotations

import dataclasses
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from kvexp.engines.trtllm import cache, plan
from kvexp.errors import ConfigError, MissingDependency, UnsupportedConfig

if TYPE_CHECKING:
    from kvexp.config import RunSpec

PIP_SPEC = "tensorrt-llm>=1.0,<1.3"
INSTALL_HINT = (f"pip install --extra-index-url https://pypi.nvidia.com '{PIP_SPEC}', see scripts/setup_colab.sh")
MISSING_MESSAGE = f"engine=trtllm needs tensorrt_llm ({INSTALL_HINT}), or use engine=torch"
MIN_CAPABILITY = (8, 0)  # Ampere: the oldest architecture TensorRT-LLM 1.x supports (A100, A10, L4 is 8.9)
FP8_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (L4, L40S) and Hopper (H100)
LAST_TRT_BACKEND = (1, 2)  # versions after 1.2 removed tensorrt_llm._tensorrt_engine (and with it INT8 KV)


def kv_scales_substituted(spec: RunSpec) -> bool:
    """True when the preset asks for dynamic per-token KV scales that TensorRT-LLM replaces by per-tensor ones.

    Why accept instead of reject: int8kv and fp8kv are the default KV presets and `quant=fp16,int8kv,awq
    engine=trtllm` is the sweep this engine exists for. TensorRT-LLM 1.x has exactly one KV scale granularity, a
    calibrated scale per tensor (its XQA kernels dequantize with one scale), so "INT8 KV on TensorRT-LLM" can only
    mean that. The run records the substitution (plan notes) and the capability table still says static/tensor,
    so head-granularity requests are rejected; quant=int8kv_static is the like-for-like preset on engine=torch.
    """
    kv = spec.cfg.quant.kv_cache
    return kv.dtype in ("int8", "fp8") and (kv.scale, kv.granularity) == ("dynamic", "token")


def with_engine_kv_scales(spec: RunSpec) -> RunSpec:
    """The spec as TensorRT-LLM will run it (per-tensor KV scales), for the base capability check."""
    if not kv_scales_substituted(spec):
        return spec
    cfg = spec.cfg
    kv = dataclasses.replace(cfg.quant.kv_cache, scale="static", granularity="tensor")
    quant = dataclasses.replace(cfg.quant, kv_cache=kv)
    return dataclasses.replace(spec, cfg=dataclasses.replace(cfg, quant=quant))


def check_config(spec: RunSpec) -> None:
    """Rules that hold on any machine: backend vs quant mode, calibration source."""
    q, backend = spec.cfg.quant, spec.engine_options.backend
    if backend == "pytorch":
        if q.kv_cache.dtype == "int8":
            raise UnsupportedConfig("quant.kv_cache.dtype=int8: TensorRT-LLM's PyTorch backend has KV dtypes "
                                    "auto/fp8 only; use engine.backend=tensorrt")
        if (q.weights.dtype, q.weights.algo) != ("auto", "none"):
            raise UnsupportedConfig(f"quant.weights (dtype={q.weights.dtype}, algo={q.weights.algo}): engine.backend="
                                    "pytorch loads only pre-quantized checkpoints; use engine.backend=tensorrt, "
                                    "which quantizes at build")
    if plan.needs_calibration(spec):
        _check_calib_source(q.calib.dataset)


def _check_calib_source(dataset: str) -> None:
    """The sources kvexp.quant.calib reads, checked here so a dry run catches a typo too."""
    from kvexp.quant.calib import HUB_DATASETS

    if dataset == "builtin" or dataset in HUB_DATASETS:
        return
    if not (cache.is_local_calib(dataset) and Path(dataset).expanduser().is_file()):
        raise ConfigError(f"quant.calib.dataset={dataset}: not builtin, {', '.join(HUB_DATASETS)}, or an existing "
                          ".txt/.jsonl file")


def installed_version() -> Optional[str]:
    """The installed tensorrt_llm version from its metadata, without importing it; None if absent or unknown."""
    if find_spec("tensorrt_llm") is None:
        return None
    try:
        return version("tensorrt_llm")
    except PackageNotFoundError:  # e.g. a source tree on sys.path: version unknown
        return None


def gpu_name() -> Optional[str]:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def check_environment(spec: RunSpec) -> None:
    """Rules for actually running: tensorrt_llm present and in range, a GPU it supports, FP8 hardware for fp8."""
    if find_spec("tensorrt_llm") is None:
        raise MissingDependency(MISSING_MESSAGE)
    found = installed_version()
    if found is not None:
        _check_version(spec, found)
    _check_gpu(spec)


def _release(found: str) -> tuple[int, int]:
    from packaging.version import Version

    major, minor = (Version(found).release + (0,))[:2]
    return major, minor


def _check_version(spec: RunSpec, found: str) -> None:
    release = _release(found)
    if release < (1, 0):
        raise MissingDependency(f"engine=trtllm needs tensorrt_llm>=1.0,<1.3 (found {found}): {INSTALL_HINT}")
    if release > LAST_TRT_BACKEND and spec.engine_options.backend == "tensorrt":
        what = ("quant.kv_cache.dtype=int8 needs" if spec.cfg.quant.kv_cache.dtype == "int8"
                else "engine.backend=tensorrt needs")
        raise UnsupportedConfig(f"{what} TensorRT-LLM's TensorRT-engine backend, removed after 1.2 (found "
                                f"tensorrt_llm {found}): pip install '{PIP_SPEC}'")


def _check_gpu(spec: RunSpec) -> None:
    if not torch.cuda.is_available():
        raise MissingDependency("engine=trtllm needs an NVIDIA GPU (Ampere sm80 or newer) and none is visible; "
                                "use engine=torch on this machine")
    capability = tuple(torch.cuda.get_device_capability(0))
    name, sm = torch.cuda.get_device_name(0), "sm{}{}".format(*capability)
    if capability < MIN_CAPABILITY:
        raise UnsupportedConfig(f"engine=trtllm: {name} ({sm}) is older than TensorRT-LLM 1.x supports (Ampere "
                                "sm80+: A100, L4, H100); use engine=torch, which runs every quant preset there")
    q = spec.cfg.quant
    if "fp8" in (q.weights.dtype, q.kv_cache.dtype) and capability < FP8_CAPABILITY:
        raise UnsupportedConfig(f"quant={q.name}: FP8 needs an sm89+ GPU (L4, L40S, H100) and {name} is {sm}; "
                                "use quant=int8kv or quant=awq on it")
