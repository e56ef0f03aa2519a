"""FP8 (e4m3) linears: weights with one scale per output channel, activations either kept in the model dtype
(weight-only) or rounded to e4m3 per token (dynamic: amax / 448 of each row) or with one calibrated scale
(static, ModelOpt's FP8 input quantizer).

Stored format: qweight [N, K] float8_e4m3fn, scales [N] float32 (amax of the row / 448), w = q * scale; the
optional input_scale is a 0-d float32 tensor. The rounding of weights and activations is defined once, here
and in kvexp.core.kernels.wq_matmul.quantize_rows_ref, and every kernel reproduces it bit for bit: only the
GEMM's summation order differs between the CPU reference and the GPU.

Kernels, chosen per device by `prepare` (`kernel` attribute):
  triton     decode rows (<= GEMV_ROWS) through the Triton GEMV reading e4m3 weights (and, W8A8, rounding the
             activations to e4m3 inside the same launch); more rows run scaled_mm's path (W8A8) or a transient
             dense weight and cuBLAS (weight-only). CUDA sm89+.
  scaled_mm  every row count through torch._scaled_mm (row-wise scales, bf16 out), kept for side-by-side
             measurement against the GEMV; weight-only layers have no _scaled_mm form and keep triton's.
  reference  PyTorch float32 math on the same e4m3 values: the CPU path and what the tests hold the GPU to.
Below sm89 (A100, T4) there are no fp8 conversions or tensor cores: kvexp.core.fp8.check_device refuses.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kvexp.core.int4 import PackedLinear
from kvexp.core.kernels.wq_matmul import GEMV_ROWS, dense_tile, quantize_rows_ref
from kvexp.errors import UnsupportedConfig

FP8_CAPABILITY = (8, 9)  # e4m3 conversions and tensor cores: Ada (L4, L40S) and Hopper (H100, H200)
KERNELS = ("auto", "triton", "scaled_mm", "reference")


def check_device(device: torch.device, what: str) -> None:
    """Refuse fp8 on a CUDA GPU below sm89, naming its compute capability and what runs there instead."""
    if device.type != "cuda":
        return
    cap = torch.cuda.get_device_capability(device)
    if cap < FP8_CAPABILITY:
        raise UnsupportedConfig(
            f"{what}: fp8 needs an sm89+ GPU (L4, L40S, H100, H200) and {torch.cuda.get_device_name(device)} is "
            f"sm{cap[0]}{cap[1]}; run quant=int8kv (8-bit KV cache) or quant=awq (int4 weights) there")


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (e4m3 [N, K], float32 scales [N]): one scale per output channel, amax / 448."""
    return quantize_rows_ref(w)


class Fp8Linear(PackedLinear):
    """y = x @ (q * scale)^T + bias over e4m3 weights; with `activations`, x is first rounded to e4m3 (per token,
    or with input_scale when calibrated). Subclasses PackedLinear for the model's fused-projection and silu * up
    epilogue paths; `group` is only the Triton kernel's K tile (the scales are per row)."""
    bits = 8
    fmt = "fp8"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, activations: bool,
                 input_scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None):
        super().__init__(qweight, scales, dense_tile(qweight.shape[1]), None, bias)
        self.activations = activations
        self.register_buffer("input_scale", input_scale)

    @classmethod
    def from_linear(cls, m: nn.Linear, activations: bool, input_scale: Optional[torch.Tensor] = None) -> "Fp8Linear":
        qweight, scales = quantize_weight(m.weight.detach())
        return cls(qweight, scales, activations, input_scale, None if m.bias is None else m.bias.detach())

    @classmethod
    def concat(cls, layers: list["PackedLinear"]) -> Optional["Fp8Linear"]:
        """The layers side by side; calibrated input scales become their max (the fused matrix reads one input,
        so it gets one scale: q, k and v see the same tensor anyway, and TensorRT-LLM fuses them the same way)."""
        first = layers[0]
        if any(type(m) is not cls or m.activations != first.activations or
               (m.input_scale is None) != (first.input_scale is None) or
               (m.bias is None) != (first.bias is None) for m in layers):
            return None
        scale = None if first.input_scale is None else torch.stack([m.input_scale for m in layers]).amax()
        bias = None if first.bias is None else torch.cat([m.bias for m in layers])
        return cls(torch.cat([m.qweight for m in layers]), torch.cat([m.scales for m in layers]), first.activations,
                   scale, bias)

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scales[:, None]

    def prepare(self, kernel: str = "auto", tinygemm_first: bool = True) -> str:
        """PackedLinear.prepare for e4m3 weights (tinygemm_first is int4's and means nothing here)."""
        if kernel not in KERNELS:
            raise ValueError(f"kernel={kernel}: not one of {', '.join(KERNELS)}")
        dev = self.qweight.device
        fast = dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= FP8_CAPABILITY
        # _scaled_mm wants K and N in multiples of 16; the GEMV a K tile of 32+
        fits = self.group > 0 and self.out_features % 16 == 0
        if kernel == "auto":
            kernel = "triton" if fast and fits else "reference"
        if kernel in ("triton", "scaled_mm") and not (fast and fits):
            raise ValueError(f"kernel={kernel}: needs a CUDA sm89+ GPU, in_features % 32 == 0 and "
                             "out_features % 16 == 0")
        self.kernel = kernel
        return kernel

    def _gemv(self, x: torch.Tensor, gated: bool) -> Optional[torch.Tensor]:
        rows = x.reshape(-1, self.in_features)
        if self.kernel != "triton" or rows.shape[0] > GEMV_ROWS:
            return None
        from kvexp.core.kernels.wq_matmul import wq_matmul

        x_quant = None if not self.activations else "dynamic" if self.input_scale is None else "static"
        y = wq_matmul(rows, self.qweight, self.scales, self.group, 8, None, self.bias, gated, row_scale=True,
                      x_quant=x_quant, x_scale=self.input_scale if self.activations else None)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._gemv(x, gated=False)
        if y is not None:
            return y
        rows = x.reshape(-1, self.in_features)
        if self.kernel == "reference":
            y = self._reference(rows)
        elif self.activations:
            from kvexp.core.kernels.wq_matmul import quantize_rows

            xq, xs = quantize_rows(rows, self.input_scale)
            y = torch._scaled_mm(xq, self.qweight.t(), scale_a=xs[:, None], scale_b=self.scales[None, :],
                                 out_dtype=x.dtype)
            y = y if self.bias is None else y + self.bias
        else:  # prefill: a transient dense weight (only e4m3 stays resident; one Triton pass), then cuBLAS
            from kvexp.core.kernels.wq_matmul import dequantize

            w = dequantize(self.qweight, self.scales[:, None], self.in_features, 8, x.dtype)
            y = F.linear(rows, w, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _reference(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 math on the e4m3 values: (x_q . q) * x_scale * w_scale, or x . q * w_scale (weight-only)."""
        if self.activations:
            xq, xs = quantize_rows_ref(rows, self.input_scale)
            y = (xq.float() @ self.qweight.float().t()) * xs[:, None] * self.scales[None, :]
        else:
            y = (rows.float() @ self.qweight.float().t()) * self.scales[None, :]
        y = y if self.bias is None else y + self.bias.float()
        return y.to(rows.dtype)


def swap_fp8(model: nn.Module, activations: bool, input_scales: Optional[dict[str, torch.Tensor]] = None) -> int:
    """Replace every projection of the decoder layers (q/k/v/o, gate/up/down; not the head) by an Fp8Linear
    quantized from its dense weight; input_scales: {linear name: calibrated 0-d scale} for static activations.
    Returns how many were swapped."""
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and ".layers." in n and n.endswith("_proj")]
    for name in names:
        parent_name, child = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        scale = None if input_scales is None else input_scales[name].float().to(old.weight.device)
        setattr(parent, child, Fp8Linear.from_linear(old, activations, scale))
    return len(names)
