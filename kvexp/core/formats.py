"""KV-cache number formats and their reference (pure PyTorch) math: what a cache stores and how it reads back.

Dequantization is x = q * scale (int4: (nibble - 8) * scale; two nibbles per byte, the even element in the low
nibble). Scales are stored as bfloat16: 2 bytes keep int8 KV at 66/128 of bf16's bytes for head_dim 64, and
bf16's range never underflows; values are quantized with the stored (rounded) scale, so the round trip is
exactly what the kernels read. The cache classes (kvexp.core.kv) and the Triton kernels (kvexp.core.kernels)
both build on this module, which imports neither.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class KVFormat:
    name: str
    storage: torch.dtype
    qmax: float  # largest representable magnitude of the quantized value
    bits: int

    @property
    def packed(self) -> bool:
        return self.bits == 4


FORMATS = {
    "int8": KVFormat("int8", torch.int8, 127.0, 8),
    "fp8": KVFormat("fp8", torch.float8_e4m3fn, 448.0, 8),
    "int4": KVFormat("int4", torch.uint8, 7.0, 4),
}


def dynamic_scale(x: torch.Tensor, fmt: KVFormat) -> torch.Tensor:
    """Per-vector scale over the last dim: x [..., D] -> [...] in SCALE_DTYPE (never zero)."""
    amax = x.float().abs().amax(-1).clamp_min(1e-6)
    return (amax / fmt.qmax).to(SCALE_DTYPE)


def quantize(x: torch.Tensor, scale: torch.Tensor, fmt: KVFormat) -> torch.Tensor:
    """x [..., D] with scale broadcastable to x[..., 0] -> storage [..., D] (int4: [..., D/2])."""
    y = x.float() / scale.float()[..., None]
    if fmt.name == "fp8":
        return y.clamp(-fmt.qmax, fmt.qmax).to(fmt.storage)
    q = torch.round(y).clamp(-fmt.qmax - (1 if fmt.packed else 0), fmt.qmax)
    if not fmt.packed:
        return q.to(torch.int8)
    u = (q + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def dequantize(q: torch.Tensor, scale: torch.Tensor, fmt: KVFormat, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of quantize: storage [..., D or D/2] -> [..., D] in dtype (math in float32)."""
    if fmt.packed:
        lo, hi = (q & 0xF).float() - 8, (q >> 4).float() - 8
        vals = torch.stack((lo, hi), -1).flatten(-2)
    else:
        vals = q.float()
    return (vals * scale.float()[..., None]).to(dtype)
