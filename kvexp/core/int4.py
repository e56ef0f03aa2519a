"""Packed INT4 (and INT8) weights with group scales, the weight-only formats AWQ and RTN produce, and the
linear layers that run them.

Stored format (kvexp's, engine-neutral; kvexp.core.kernels.wq_matmul reads it as is): int4 qweight [N, K/2]
uint8 holding q + 8 for q in [-8, 7], column 2i in the low nibble and 2i+1 in the high one; int8 qweight
[N, K] int8 in [-127, 127]; scales [N, K/group] in the compute dtype; optional pre_scale [K] (AWQ's
per-input-channel smoothing: the layer computes (x * pre_scale) @ W_deq^T). Dequantization is w = q * scale,
ModelOpt's INT4 block format (scale = amax / 7; amax / 127 for int8).

Kernels, chosen per device by `prepare` (`kernel` attribute):
  triton    decode rows (<= GEMV_ROWS) through the Triton W4A16/W8A16 kernel, which reads the packed weights;
            more rows (prefill, scoring) dequantize once per call (Triton, ~2.5 bytes per weight) and run a
            dense GEMM. CUDA sm80+, fp16/bf16.
  tinygemm  torch's int4 kernel (aten._weight_int4pack_mm, sm80+, bf16) in its own layout, kept for side-by-side
            measurement; its layout replaces qweight, so a dense weight is rebuilt through the same kernel
            (an identity product), worth it only when the rows outnumber the input features.
  dequant   Triton dequantize + dense GEMM for every call (GPUs the W4A16 kernel does not target, e.g. T4 sm75).
  reference PyTorch dequantize + F.linear: the CPU path and the tests' reference.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kvexp.core.kernels.wq_matmul import BITS_QMAX, GEMV_ROWS, dense_tile, dequantize_ref, unpack_ref

KERNELS = ("auto", "triton", "tinygemm", "dequant", "reference")


def quantize_groups(w: torch.Tensor, amax: torch.Tensor, group: int, bits: int = 4) -> torch.Tensor:
    """w [N, K], amax [N, K/group] -> integer q [N, K] on the symmetric `bits` grid (as int8)."""
    N, K = w.shape
    qmax = BITS_QMAX[bits]
    scale = (amax.float() / qmax).clamp_min(1e-12)[..., None]
    q = torch.round(w.float().reshape(N, K // group, group) / scale).clamp(-qmax - (bits == 4), qmax)
    return q.reshape(N, K).to(torch.int8)


def pack(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] int in [-8, 7] -> [N, K/2] uint8 (even columns low nibble)."""
    u = (q + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack(qweight: torch.Tensor) -> torch.Tensor:
    """[N, K/2] uint8 -> q [N, K] int8 in [-8, 7]."""
    return unpack_ref(qweight, 4)


def rtn_quantize(w: torch.Tensor, group: int, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest baseline: per-group amax scales. Returns (qweight, scales float32 [N, K/group])."""
    N, K = w.shape
    amax = w.float().reshape(N, K // group, group).abs().amax(-1)
    q = quantize_groups(w, amax, group, bits)
    return (pack(q) if bits == 4 else q), amax / BITS_QMAX[bits]


def quantize_linear(linear: nn.Linear, bits: int, group: int) -> "PackedLinear":
    """Round-to-nearest `bits`-wide copy of a dense linear (the output head on request), scales in its dtype."""
    w = linear.weight.detach()
    group = group if w.shape[1] % group == 0 else w.shape[1]  # one scale per row where groups do not fit
    qweight, scales = rtn_quantize(w, group, bits)
    bias = None if linear.bias is None else linear.bias.detach()
    return (Int4Linear if bits == 4 else Int8Linear)(qweight, scales.to(w.dtype), group, None, bias)


class PackedLinear(nn.Module):
    """y = (x * pre_scale) @ (q * scale)^T + bias over packed `bits`-wide weights (see the module docstring)."""
    bits = 0  # set by each subclass
    fmt = ""  # the weight format's name, as prepare_kernels counts layers ("int4.triton": n)

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, group: int,
                 pre_scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape[0], qweight.shape[1] * (2 if self.bits == 4 else 1)
        self.group = group
        self.kernel = "reference"
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("pre_scale", pre_scale)
        self.register_buffer("bias", bias)
        self.register_buffer("tg_weight", None)  # tinygemm layout, replaces qweight (kernel "tinygemm")
        self.register_buffer("tg_scales_zeros", None)

    @classmethod
    def concat(cls, layers: list["PackedLinear"]) -> Optional["PackedLinear"]:
        """The layers' outputs side by side in one layer (before prepare), or None when their input scales
        differ: AWQ smooths each layer's inputs with its own pre_scale."""
        first = layers[0]
        if any(type(m) is not cls or m.qweight is None or m.group != first.group for m in layers):
            return None
        pres = [m.pre_scale for m in layers]
        if any((p is None) != (pres[0] is None) or (p is not None and not torch.equal(p, pres[0])) for p in pres):
            return None
        if any((m.bias is None) != (first.bias is None) for m in layers):
            return None
        bias = None if first.bias is None else torch.cat([m.bias for m in layers])
        return cls(torch.cat([m.qweight for m in layers]), torch.cat([m.scales for m in layers]), first.group,
                   pres[0], bias)

    def dequantize(self) -> torch.Tensor:
        """The dense weight [N, K] float32 (reference math)."""
        return dequantize_ref(self.qweight, self.scales, self.group, self.bits)

    def prepare(self, kernel: str = "auto", tinygemm_first: bool = True) -> str:
        """Choose the kernel for this layer's device and dtype; returns it. 'auto': the first that its device,
        dtype and shape allow of tinygemm (unless not tinygemm_first), triton, dequant, reference."""
        if kernel not in KERNELS:
            raise ValueError(f"kernel={kernel}: not one of {', '.join(KERNELS)}")
        dev = self.qweight.device
        from kvexp.core.kernels import triton_available

        dtype = self.qweight.dtype if self.bits == 16 else self.scales.dtype
        gpu = dev.type == "cuda" and triton_available() and dtype in (torch.float16, torch.bfloat16)
        sm80 = gpu and torch.cuda.get_device_capability(dev)[0] >= 8
        if kernel == "auto":  # int4 at batch 1: tinygemm won the H200 side by side (docs/benchmarks.md, issue 14)
            tinygemm = tinygemm_first and self.bits == 4 and sm80 and self._prepare_tinygemm()
            kernel = "tinygemm" if tinygemm else "triton" if sm80 and self.group % 32 == 0 else \
                "dequant" if gpu else "reference"
        if kernel == "tinygemm" and self.tg_weight is None and not self._prepare_tinygemm():
            raise ValueError("kernel=tinygemm: needs int4 bf16 weights on a CUDA sm80+ GPU, group 32-256, "
                             "out_features % 8 == 0 and in_features % 64 == 0")
        if kernel in ("triton", "dequant") and not (sm80 if kernel == "triton" else gpu):
            raise ValueError(f"kernel={kernel}: needs fp16/bf16 weights on a CUDA GPU with triton"
                             + (" (sm80+)" if kernel == "triton" else ""))
        self.kernel = kernel
        return kernel

    def _prepare_tinygemm(self) -> bool:
        """Repack for torch.ops.aten._weight_int4pack_mm when the device and shapes allow it."""
        dev = self.qweight.device
        if self.bits != 4 or dev.type != "cuda" or torch.cuda.get_device_capability(dev)[0] < 8 \
                or self.scales.dtype != torch.bfloat16:
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

    def prepare_tinygemm(self) -> bool:
        """The tinygemm kernel if this layer allows it (True), else the layer is unchanged (False)."""
        if not self._prepare_tinygemm():
            return False
        self.kernel = "tinygemm"
        return True

    def silu_mul(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """For a [gate; up] layer: silu(gate) * up [..., out/2] with the product in the kernel's epilogue, or
        None where this kernel and row count have no such epilogue (then apply fused.silu_mul to forward's)."""
        return self._gemv(x, gated=True)

    def _gemv(self, x: torch.Tensor, gated: bool) -> Optional[torch.Tensor]:
        rows = x.reshape(-1, self.in_features)
        if self.kernel != "triton" or rows.shape[0] > GEMV_ROWS:
            return None
        from kvexp.core.kernels.wq_matmul import wq_matmul

        y = wq_matmul(rows, self.qweight, self.scales, self.group, self.bits, self.pre_scale, self.bias, gated)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._gemv(x, gated=False)
        if y is not None:
            return y
        if self.pre_scale is not None:
            x = x * self.pre_scale
        if self.kernel == "tinygemm":
            return self._tinygemm(x)
        return F.linear(x, self._dense(x.dtype), self.bias)

    def _dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense weight [N, K] in dtype, transient: built per call, so only packed weights stay resident."""
        if self.bits == 16:
            return self.qweight
        if self.kernel == "reference":
            return dequantize_ref(self.qweight, self.scales, self.group, self.bits, dtype)
        from kvexp.core.kernels.wq_matmul import dequantize

        return dequantize(self.qweight, self.scales, self.group, self.bits, dtype)

    def _tinygemm(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] >= self.in_features:  # rebuilding the weight (I_K @ W^T) costs less than tinygemm's tiles
            eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=x.device)
            w = torch.ops.aten._weight_int4pack_mm(eye, self.tg_weight, self.group, self.tg_scales_zeros).t()
            return F.linear(x, w, self.bias)
        y = torch.ops.aten._weight_int4pack_mm(rows, self.tg_weight, self.group, self.tg_scales_zeros)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int4Linear(PackedLinear):
    bits = 4
    fmt = "int4"


class Int8Linear(PackedLinear):
    bits = 8
    fmt = "int8"


class DenseLinear(PackedLinear):
    """An unquantized linear (qweight is the dense weight [N, K], no scales) run by the same Triton kernel at
    decode, for its fused silu * up epilogue and split-K at small N; prefill is a plain F.linear."""
    bits = 16
    fmt = "dense"

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
        super().__init__(weight, None, dense_tile(weight.shape[1]), None, bias)

    @classmethod
    def from_linear(cls, m: nn.Linear) -> "DenseLinear":
        return cls(m.weight.detach(), None if m.bias is None else m.bias.detach())

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float()
