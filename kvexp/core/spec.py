"""The frozen, fully resolved description of what an engine builds: the BuildSpec.

Made once per job at preflight (kvexp.resolve), before anything is built: no `auto` is left in it, the model is
named by a content fingerprint (or a Hub commit, or a builtin's recipe version) and calibration data by the
digest of its source, so two runs with equal BuildSpecs build the same engine on the same kind of machine. The
run's hash is the hash of its BuildSpec with the eval, bench and context settings and NUMERICS_VERSION; every
derived artifact is keyed by the part of the BuildSpec that determines it (artifact_key).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

# Bump when a change to kvexp makes the same BuildSpec produce different numbers (a kernel's rounding, a scale
# rule, the fidelity prompts): every earlier result then counts as another experiment and runs again.
# 8: programmatic dependent launch of the Triton kernels on sm90+ (the same values, a faster decode step); 7: e4m3
# rounding of activations (and fp8 weights) as x * (448 / amax), inside the W8A8 GEMV; 6: AWQ's input
# scales folded into the norms and up's rows; 5: unmasked full blocks in decode attention (int8, int4); 4: decode
# attention's slice count and one-tile merge; 3: AWQ's shared input scales
NUMERICS_VERSION = 8


@dataclass(frozen=True)
class WeightFormat:
    dtype: str  # "auto" (the model dtype) | "int4" | "fp8"
    algo: str  # "none" | "awq" | "rtn"
    group_size: int
    lm_head: str = "bf16"  # the output head: "bf16" (the model dtype) | "int8" | "int4"
    activations: str = "auto"  # the linears' inputs: "auto" (the model dtype) | "fp8" (e4m3, W8A8)
    act_scale: str = "dynamic"  # fp8 activations: "dynamic" (per token) | "static" (calibrated, per linear)

    @property
    def quantized(self) -> bool:
        return self.dtype != "auto" or self.lm_head != "bf16"


@dataclass(frozen=True)
class KVFormatSpec:
    dtype: str  # "auto" (the model dtype) | "int8" | "fp8" | "int4"
    scale: str  # "dynamic" | "static"
    granularity: str  # "token" | "head" | "tensor"

    @property
    def quantized(self) -> bool:
        return self.dtype != "auto"


@dataclass(frozen=True)
class BuildSpec:
    engine: str  # "torch" | "trtllm" | ...
    model: str  # what the user named (a path, a Hub id, builtin:<name>): a label, not part of the identity
    model_fingerprint: str  # sha256 of the checkpoint's files | hub:<id>@<commit> | builtin:<name>@v<version>
    model_dir: Optional[str]  # the local checkpoint directory, when known at preflight (not for a Hub download)
    device: str  # "cpu" | "cuda:N"
    device_name: str  # "NVIDIA H200" | "cpu (<model name>, N cores)"
    dtype: str  # activation / compute dtype: "float32" | "float16" | "bfloat16"
    weights: WeightFormat
    kv: KVFormatSpec
    attention: str  # the decode attention that serves the run: "triton:<fmt>" | "torch:<fmt>" | "trtllm"
    calib: Optional[dict]  # {"source": digest, "num_samples": n, "seq_len": n} when anything is calibrated
    options: dict = field(default_factory=dict)  # the engine's options, resolved (device spelled out)
    versions: dict = field(default_factory=dict)  # the libraries that compute the numbers
    numerics: int = NUMERICS_VERSION

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def identity(self) -> dict:
        """Everything that determines the engine's numbers (the label `model` and the local path are not)."""
        data = dataclasses.asdict(self)
        data.pop("model")
        data.pop("model_dir")
        return data

    def artifact_key(self, *parts: str) -> dict[str, Any]:
        """The named fields (and always the model and numerics version): the key of a derived artifact."""
        data = self.identity
        return {"model_fingerprint": self.model_fingerprint, "numerics": self.numerics} | {p: data[p] for p in parts}

    @property
    def numerics_only(self) -> bool:
        """fp8 on a CPU: the e4m3 rounding is exact, the GEMM is float32 emulation, so its speed means nothing."""
        return self.torch_device.type == "cpu" and "fp8" in (self.weights.dtype, self.weights.activations)

    def unquantized(self, attention: str) -> "BuildSpec":
        """The same build with unquantized weights and KV cache (the fidelity reference's), served by attention."""
        return dataclasses.replace(self, weights=WeightFormat("auto", "none", self.weights.group_size, "bf16"),
                                   kv=KVFormatSpec("auto", "dynamic", "token"), attention=attention, calib=None)
