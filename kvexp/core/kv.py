"""KV caches: a dense one in the model dtype and quantized ones in kvexp.core.formats' formats.

Layout (every layer, every format): values [B, Hkv, T, D] (int4: [B, Hkv, T, D/2] uint8, two nibbles),
dynamic scales [B, Hkv, T] (one per token and head), static scales [Hkv] float32 (per head; a
per-tensor scale is the same value repeated). Keys are stored after RoPE, as attention reads them.
"""
from __future__ import annotations

from typing import Optional

import torch

from kvexp.core.formats import FORMATS, SCALE_DTYPE, KVFormat, dequantize, dynamic_scale, quantize  # noqa: F401
from kvexp.core.kernels.kv_write import rope_write, write_kv


class KVCache:
    """Static, dense cache in the model dtype: what fp16/bf16 serving reads.

    fused_write: writes (decode's one token and prefill's n per sequence) go through the fused Triton
    quantize-and-store kernel (kvexp.core.kernels.kv_write), one launch per layer instead of ~10 small ones
    (issue 13: at 512 prompt tokens those made int8kv's TTFT 1.6x fp16's); same bits as the torch path.
    """
    fmt_name = "dense"

    def __init__(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, fused_write: bool = False):
        self._init_storage(layers, batch, kv_heads, max_len, head_dim, dtype, device, fused_write, dtype, head_dim)

    def _init_storage(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                      device: torch.device, fused_write: bool, storage: torch.dtype, width: int) -> None:
        """The attributes every cache shares and zeroed K and V values: per layer [B, Hkv, T, width] of
        `storage` (dtype stays the model's: what read returns)."""
        self.layers, self.batch, self.kv_heads, self.max_len, self.head_dim = layers, batch, kv_heads, max_len, head_dim
        self.dtype, self.device, self.fused_write = dtype, torch.device(device), fused_write
        shape = (batch, kv_heads, max_len, width)
        self.k = [torch.zeros(shape, dtype=storage, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=storage, device=device) for _ in range(layers)]

    @staticmethod
    def _index(pos: torch.Tensor, n: int) -> torch.Tensor:
        """pos [B] start positions -> [B, n] absolute positions of n new tokens."""
        return pos[:, None] + torch.arange(n, device=pos.device)

    def scales(self, layer: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        return None, None

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """k, v [B, Hkv, n, D] written at positions pos[b] .. pos[b]+n-1 of each sequence."""
        if self.fused_write:
            # one fresh [2, B, Hkv, n, D] tensor: k and v get identical strides (compiled ops may give size-1 dims
            # of otherwise contiguous tensors any stride, and the kernel shares one set of strides)
            kv = torch.stack((k, v))
            write_kv(kv[0], kv[1], self.k[layer], self.v[layer], *self.scales(layer), pos, self.fmt_name)
            return
        self._write(layer, k, v, pos)

    def write_rope(self, layer: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                   heads: int) -> torch.Tensor:
        """fused_write caches: RoPE'd k and v of the q|k|v projection [B, n, (heads + 2 Hkv) D] written at pos as
        write() does, in the same launch that returns the RoPE'd queries [B, heads, n, D] (cos/sin [B, 1, n, D])."""
        return rope_write(qkv, cos, sin, heads, self.k[layer], self.v[layer], *self.scales(layer), pos, self.fmt_name)

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        idx = self._index(pos, k.shape[2])[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        self.k[layer].scatter_(2, idx, k.to(self.dtype))
        self.v[layer].scatter_(2, idx, v.to(self.dtype))

    def read(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` positions as [B, Hkv, length, D] in the model dtype."""
        return self.k[layer][:, :, :length], self.v[layer][:, :, :length]

    def tensors(self) -> list[torch.Tensor]:
        return self.k + self.v

    def bytes_per_token(self) -> float:
        """Measured: bytes of every allocated cache tensor over the token slots they hold."""
        return sum(t.numel() * t.element_size() for t in self.tensors()) / (self.batch * self.max_len)

    def formula_bytes_per_token(self) -> float:
        return self.layers * 2 * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits / 8


class QuantizedKVCache(KVCache):
    """int8 / fp8 / int4 values with per-(token, head) dynamic scales or calibrated static per-head scales."""

    def __init__(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, fmt: KVFormat,
                 static_scales: Optional[tuple[torch.Tensor, torch.Tensor]] = None, fused_write: bool = False):
        self._init_storage(layers, batch, kv_heads, max_len, head_dim, dtype, device, fused_write, fmt.storage,
                           head_dim // 2 if fmt.packed else head_dim)
        self.fmt, self.fmt_name = fmt, fmt.name
        self.static = static_scales is not None
        if self.static:
            # static_scales: (k [L, Hkv], v [L, Hkv]) float32 from calibration (amax / qmax)
            self.k_scale = [s.float().to(device) for s in static_scales[0]]
            self.v_scale = [s.float().to(device) for s in static_scales[1]]
        else:
            ones = (batch, kv_heads, max_len)
            self.k_scale = [torch.ones(ones, dtype=SCALE_DTYPE, device=device) for _ in range(layers)]
            self.v_scale = [torch.ones(ones, dtype=SCALE_DTYPE, device=device) for _ in range(layers)]

    def _quantize(self, x: torch.Tensor, layer_scale: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.static:
            return quantize(x, layer_scale[None, :, None], self.fmt), None
        scale = dynamic_scale(x, self.fmt)
        return quantize(x, scale, self.fmt), scale

    def scales(self, layer: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        return self.k_scale[layer], self.v_scale[layer]

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        n = k.shape[2]
        t = self._index(pos, n)[:, None, :].expand(-1, k.shape[1], -1)  # [B, Hkv, n]
        for values, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            q, s = self._quantize(x, scales[layer])
            # scatter through a byte view: every format is one byte wide, and CPU scatter has no float8 kernel
            values[layer].view(torch.uint8).scatter_(2, t[..., None].expand(-1, -1, -1, q.shape[-1]), q.view(torch.uint8))
            if s is not None:
                scales[layer].scatter_(2, t, s)

    def read(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for values, scales in ((self.k, self.k_scale), (self.v, self.v_scale)):
            s = scales[layer][None, :, None] if self.static else scales[layer][:, :, :length]
            out.append(dequantize(values[layer][:, :, :length], s, self.fmt, self.dtype))
        return out[0], out[1]

    def tensors(self) -> list[torch.Tensor]:
        return self.k + self.v + self.k_scale + self.v_scale

    def bytes_per_token(self) -> float:
        # Static scales are per layer, not per token: they are not token storage.
        per_token = self.k + self.v + ([] if self.static else self.k_scale + self.v_scale)
        return sum(t.numel() * t.element_size() for t in per_token) / (self.batch * self.max_len)

    def formula_bytes_per_token(self) -> float:
        scale = 0 if self.static else torch.finfo(SCALE_DTYPE).bits / 8
        return self.layers * 2 * self.kv_heads * (self.head_dim * self.fmt.bits / 8 + scale)
