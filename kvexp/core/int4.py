"""Packed INT4 weights with group scales (the W4A16 format AWQ produces) and the linear layer that runs them.

Stored format (kvexp's, engine-neutral): qweight [N, K/2] uint8 holding q + 8 for q in [-8, 7], column 2i
in the low nibble and 2i+1 in the high one; scales [N, K/group] in the compute dtype; optional pre_scale [K]
(AWQ's per-input-channel smoothing: the layer computes (x * pre_scale) @ W_deq^T). Dequantization is
w = q * scale, ModelOpt's INT4 block format (scale = amax / 7).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

PREFILL_ROWS = 64  # above this many rows (tokens) a layer runs as a dense GEMM on dequantized weights


def quantize_groups(w: torch.Tensor, amax: torch.Tensor, group: int) -> torch.Tensor:
    """w [N, K], amax [N, K/group] -> integer q [N, K] in [-8, 7] (as int8)."""
    N, K = w.shape
    scale = (amax.float() / 7.0).clamp_min(1e-12)[..., None]
    q = torch.round(w.float().reshape(N, K // group, group) / scale).clamp(-8, 7)
    return q.reshape(N, K).to(torch.int8)


def pack(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] int in [-8, 7] -> [N, K/2] uint8 (even columns low nibble)."""
    u = (q + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack(qweight: torch.Tensor) -> torch.Tensor:
    """[N, K/2] uint8 -> q [N, K] int8 in [-8, 7]."""
    lo, hi = (qweight & 0xF).to(torch.int8) - 8, (qweight >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), -1).flatten(-2)


def rtn_quantize(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest baseline: per-group amax scales. Returns (qweight, scales float32 [N, K/group])."""
    N, K = w.shape
    amax = w.float().reshape(N, K // group, group).abs().amax(-1)
    return pack(quantize_groups(w, amax, group)), amax / 7.0


class Int4Linear(nn.Module):
    """y = (x * pre_scale) @ (q * scale)^T + bias. On CUDA (sm80+, bf16) it runs torch's tinygemm int4 kernel;
    elsewhere it dequantizes and calls F.linear (correct everywhere, fast nowhere)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, group: int,
                 pre_scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape[0], qweight.shape[1] * 2
        self.group = group
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("pre_scale", pre_scale)
        self.register_buffer("bias", bias)
        self.register_buffer("tg_weight", None)  # tinygemm layout, replaces qweight on CUDA
        self.register_buffer("tg_scales_zeros", None)

    @classmethod
    def concat(cls, layers: list["Int4Linear"]) -> Optional["Int4Linear"]:
        """The layers' outputs side by side in one layer (before prepare_tinygemm), or None when their input
        scales differ: AWQ smooths each layer's inputs with its own pre_scale."""
        first = layers[0]
        if any(m.qweight is None or m.group != first.group for m in layers):
            return None
        pres = [m.pre_scale for m in layers]
        if any((p is None) != (pres[0] is None) or (p is not None and not torch.equal(p, pres[0])) for p in pres):
            return None
        bias = None if first.bias is None else torch.cat([m.bias for m in layers])
        return cls(torch.cat([m.qweight for m in layers]), torch.cat([m.scales for m in layers]), first.group,
                   pres[0], bias)

    def dequantize(self) -> torch.Tensor:
        q = unpack(self.qweight).float().reshape(self.out_features, -1, self.group)
        return (q * self.scales.float()[..., None]).reshape(self.out_features, self.in_features)

    def prepare_tinygemm(self) -> bool:
        """Repack for torch.ops.aten._weight_int4pack_mm when the device and shapes allow it."""
        dev = self.qweight.device
        if dev.type != "cuda" or torch.cuda.get_device_capability(dev)[0] < 8 or self.scales.dtype != torch.bfloat16:
            return False
        if self.group not in (32, 64, 128, 256) or self.out_features % 8 or self.in_features % 64:
            return False
        inner_k_tiles = next(t for t in (8, 4, 2) if self.in_features % (t * 16) == 0)
        u = (unpack(self.qweight) + 8).to(torch.uint8)
        tg_packed = (u[:, 0::2] << 4) | u[:, 1::2]  # tinygemm wants the even column in the HIGH nibble
        packed = torch.ops.aten._convert_weight_to_int4pack(tg_packed.contiguous(), inner_k_tiles)
        # tinygemm dequantizes (u - 8) * scale + zero; our format is symmetric, so zero = 0
        self.tg_scales_zeros = torch.stack((self.scales.t(), torch.zeros_like(self.scales.t())), -1).contiguous()
        self.tg_weight, self.qweight = packed, None  # keep one copy of the weights on the device
        return True

    def _tinygemm_dense(self) -> torch.Tensor:
        """The dequantized weight [N, K] (bf16) from the tinygemm layout, the only copy kept on the device:
        I_K @ W^T through the same kernel gives every weight exactly once (a transient K x K identity)."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.tg_weight.device)
        return torch.ops.aten._weight_int4pack_mm(eye, self.tg_weight, self.group, self.tg_scales_zeros).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_scale is not None:
            x = x * self.pre_scale
        if self.tg_weight is not None:
            rows = x.reshape(-1, self.in_features)
            if rows.shape[0] > PREFILL_ROWS:  # prefill: one dense GEMM beats tinygemm's 16-row tiles by ~10x
                return F.linear(x, self._tinygemm_dense(), self.bias)
            y = torch.ops.aten._weight_int4pack_mm(rows, self.tg_weight, self.group, self.tg_scales_zeros)
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.dequantize().to(x.dtype), self.bias)
