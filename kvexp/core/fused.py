"""The decode step's small element-wise stages, and the fusions that cut its kernel count.

At batch 1 a ~1B model's decode step reads ~2.5 GB of weights in ~0.6 ms on an H100, while an eager step
launches ~50 kernels per layer (norms, RoPE, SiLU, casts); even inside a CUDA graph each costs ~2 us, so the
launches, not the bytes, set the speed (measured: 33% of the roofline). On CUDA these functions are compiled
once each (torch.compile, dynamic shapes) into one fused kernel apiece, and q/k/v and gate/up projections
are concatenated into one matrix each. The eager versions are the reference and the CPU path.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """float32 statistics and a cast before the weight, as Hugging Face's LlamaRMSNorm."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """(residual + delta, rms_norm of it): the residual add fused into the next norm."""
    residual = residual + delta
    return residual, rms_norm(residual, weight, eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def split_heads(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor):
    """qkv [B, n, (H + 2 Hkv) D] -> RoPE'd q [B, H, n, D], k [B, Hkv, n, D] and v [B, Hkv, n, D], each contiguous
    (the fused cache write needs k and v in one layout). cos/sin [B, 1, n, D] (rotate-half convention)."""
    B, n, _ = qkv.shape
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    q = q.reshape(B, n, heads, head_dim).transpose(1, 2)
    k = k.reshape(B, n, kv_heads, head_dim).transpose(1, 2)
    v = v.reshape(B, n, kv_heads, head_dim).transpose(1, 2)
    return _rotate(q, cos, sin).contiguous(), _rotate(k, cos, sin).contiguous(), v.contiguous()


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2 I] (gate then up) -> silu(gate) * up [..., I]."""
    gate, up = gate_up.chunk(2, -1)
    return F.silu(gate) * up


EAGER = SimpleNamespace(rms_norm=rms_norm, add_rms_norm=add_rms_norm, split_heads=split_heads, silu_mul=silu_mul)


@functools.lru_cache(maxsize=None)
def compiled() -> SimpleNamespace:
    """The same functions through torch.compile: one fused kernel each, shared by every layer and shape."""
    # Each function keeps a graph per model (eps is a constant), per row count of 1 (decode: dynamic shapes
    # still specialise 1) or more, and per caller under inference_mode or not. A sweep builds its engines in one
    # process, so dynamo's default of 8 graphs a function ended the ninth (H200, 2026-12-03: bench_decode's fp8
    # variants on the second model shape stopped with FailOnRecompileLimitHit under fullgraph=True).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    return SimpleNamespace(**{name: torch.compile(fn, dynamic=True, fullgraph=True)
                              for name, fn in vars(EAGER).items()})


def concat_linears(layers: list[torch.nn.Module]):
    """One layer computing the given layers' outputs side by side, or None when they cannot be merged
    (AWQ layers with different input scales)."""
    from kvexp.core.int4 import PackedLinear

    if all(type(m) is torch.nn.Linear for m in layers):
        biases = [m.bias for m in layers]
        merged = torch.nn.Linear(layers[0].in_features, sum(m.out_features for m in layers),
                                 bias=biases[0] is not None, device=layers[0].weight.device,
                                 dtype=layers[0].weight.dtype)
        with torch.no_grad():
            merged.weight.copy_(torch.cat([m.weight for m in layers]))
            if merged.bias is not None:
                merged.bias.copy_(torch.cat(biases))
        return merged
    if all(isinstance(m, PackedLinear) for m in layers):
        return type(layers[0]).concat(layers)
    return None
