"""engine=hf's KV caches: what transformers itself offers, mapped onto kvexp's quant.kv_cache vocabulary.

quant.kv_cache.dtype=auto  a plain transformers cache (StaticCache in generate, DynamicCache when scoring).
int8 / int4                transformers' QuantizedCache (KIVI-style: a full-precision residual window of
                           engine.kv_residual_length tokens, then everything is re-quantized and the whole cache
                           dequantized on every step), backend engine.kv_backend:
                             hqq     nbits 8 or 4; axis 1 with groups of head_dim = one asymmetric scale and zero
                                     per (token, head): the dynamic/token granularity kvexp's own cache has.
                             quanto  nbits 4 (it has 2/4 only); its axis 0 with groups of head_dim groups the same way.
fp8                        transformers' built-in fp8 backend scales per tensor from the prompt and freezes it:
                           neither kvexp's dynamic per-token nor its calibrated static scales, so it is refused.

A missing backend package is refused at validation with the pip command (find_spec: nothing is imported).
"""
from __future__ import annotations

from importlib.util import find_spec
from typing import Any

import torch

from kvexp.errors import MissingDependency, UnsupportedConfig

BITS = {"int8": 8, "int4": 4}
# backend -> (the package it imports, its pip name, the quant.kv_cache.dtype values it stores, the axis that makes
# its groups of head_dim contiguous elements of [B, Hkv, T, D]: one group per (token, head); the two libraries differ)
BACKENDS = {
    "hqq": ("hqq", "hqq", ("int8", "int4"), 1),
    "quanto": ("optimum.quanto", "optimum-quanto", ("int4",), 0),
}


def check_kv(kv_dtype: str, backend: str) -> None:
    """Validation: the backend stores this dtype and is installed. One line each, naming the fix."""
    if kv_dtype == "auto":
        return
    module, pip_name, dtypes, _ = BACKENDS[backend]
    if kv_dtype not in dtypes:
        others = [b for b, (_, _, d, _) in BACKENDS.items() if kv_dtype in d]
        raise UnsupportedConfig(f"engine.kv_backend={backend}: transformers' {backend} backend stores "
                                f"{'/'.join(dtypes)} KV, not quant.kv_cache.dtype={kv_dtype}; use engine.kv_backend="
                                f"{'|'.join(others)}")
    if find_spec(module.split(".")[0]) is None or find_spec(module) is None:
        raise MissingDependency(f"quant.kv_cache.dtype={kv_dtype} on engine=hf: transformers' {backend} backend needs "
                                f"`pip install {pip_name}` (or pip install 'kvexp[hf]'), or use engine=torch")


def quantized_cache(model_config, kv_dtype: str, backend: str, residual_length: int, head_dim: int):
    """A fresh transformers QuantizedCache for quant.kv_cache.dtype (int8|int4): groups of head_dim, one scale
    and zero per (token, head)."""
    from transformers.cache_utils import QuantizedCache

    axis = BACKENDS[backend][3]
    return QuantizedCache(backend, model_config, nbits=BITS[kv_dtype], axis_key=axis, axis_value=axis,
                          q_group_size=head_dim, residual_length=residual_length)


def _tensors(obj: Any) -> list[torch.Tensor]:
    """Every plain tensor inside a quantized state: HQQ's (uint8 tensor, meta dict), quanto's QTensor subclass
    (its inner data, scale and shift), or a plain tensor."""
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor:
            names, _ = obj.__tensor_flatten__()
            return [t for name in names for t in _tensors(getattr(obj, name))]
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensors(v)]
    return []


def measured_bytes_per_token(cache, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                             device: torch.device, tokens: int = 64) -> float:
    """Bytes per token of a cache as transformers stores it, measured: `tokens` random K/V [1, Hkv, T, D] written
    into every layer, then the bytes of every tensor it holds over T. A quantized cache quantizes its first write
    whole, so this counts the quantized values and their scales/zeros, not the residual window."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    for layer in range(layers):
        k, v = (torch.randn(1, kv_heads, tokens, head_dim, generator=gen).to(device, dtype) for _ in range(2))
        cache.update(k, v, layer)
    total = 0
    for lay in cache.layers:
        states = [lay._quantized_keys, lay._quantized_values] if hasattr(lay, "_quantized_keys") else \
            [lay.keys, lay.values]
        total += sum(t.numel() * t.element_size() for t in _tensors(states))
    return total / tokens


def formula_bytes_per_token(kv_dtype: str, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> float:
    """layers * 2 * kv_heads * (head_dim * bits/8 + scale and zero in the model dtype, per (token, head))."""
    elem = torch.finfo(dtype).bits / 8
    if kv_dtype == "auto":
        return layers * 2 * kv_heads * head_dim * elem
    return layers * 2 * kv_heads * (head_dim * BITS[kv_dtype] / 8 + 2 * elem)
