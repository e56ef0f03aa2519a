"""Static KV-cache scales: amax of post-RoPE keys and of values per layer and head over calibration data.

Per-tensor scales (TensorRT-LLM's INT8/FP8 KV style) take the max over heads; per-head keep each head's.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from kvexp import artifacts
from kvexp.core.formats import FORMATS
from kvexp.quant.weights import artifact_key

if TYPE_CHECKING:
    from kvexp.config import RunSpec


@torch.no_grad()
def kv_amax(model, batches: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the calibration windows ([b, seq_len] each) through the model, as many per forward as fit the
    device; returns (k_amax, v_amax), each [layers, kv_heads]."""
    from kvexp.quant.calib import rows_that_fit

    a = model.arch
    amax = torch.zeros(2, a.num_layers, a.num_kv_heads, device=device)
    windows = torch.cat(batches)
    rows = rows_that_fit(device, windows.shape[1], 16 * (a.hidden_size + a.intermediate_size))

    def observe(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:  # k, v: [B, Hkv, n, D]
        for i, x in enumerate((k, v)):
            amax[i, layer] = torch.maximum(amax[i, layer], x.float().abs().amax(dim=(0, 2, 3)))

    model.observer = observe
    try:
        with tqdm(total=len(windows), desc="KV scale calibration", unit="sample") as bar:
            for b in windows.split(rows):
                b = b.to(device)
                model(b, torch.zeros(b.shape[0], dtype=torch.long, device=device))
                bar.update(b.shape[0])
    finally:
        model.observer = None
    return amax[0], amax[1]


def static_kv_scales(spec: RunSpec, model, tokenizer, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached (k_scale, v_scale) [layers, kv_heads] float32 = amax / qmax, per head or per tensor."""
    from kvexp.quant.calib import calibration_batches

    q = spec.cfg.quant
    key = artifact_key(spec, "weights", "kv", "calib", "dtype")
    dest = artifacts.path(spec.cache_dir, "quant/kvscales", key, ".pt")

    def build(tmp: Path) -> None:
        k, v = kv_amax(model, calibration_batches(tokenizer, q.calib), device)
        if q.kv_cache.granularity == "tensor":
            k, v = (x.amax(-1, keepdim=True).expand_as(x).contiguous() for x in (k, v))
        torch.save((k.cpu(), v.cpu()), tmp)

    (k, v), _ = artifacts.cached(dest, "static KV scales", build, torch.load)
    qmax = FORMATS[q.kv_cache.dtype].qmax
    return (k.float().clamp_min(1e-6) / qmax).to(device), (v.float().clamp_min(1e-6) / qmax).to(device)
