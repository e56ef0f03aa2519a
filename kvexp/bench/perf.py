"""The performance stage of a run: prefill and decode timings, memory, KV bytes, and the roofline fraction.

Timings are medians over bench.iters generate() calls after bench.warmup calls (which also compile kernels
and capture the CUDA graph); every timed region ends with a device synchronisation.
"""
from __future__ import annotations

import functools
import statistics

import torch

from kvexp.config import RunSpec
from kvexp.core import memory
from kvexp.core.engine import Engine


@functools.lru_cache(maxsize=None)
def copy_bandwidth(device: str) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (bytes read + written), the roofline's ceiling."""
    n = 1 << 28  # 256 MiB each way: far larger than L2
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n / statistics.median(times)


def bench_prompts(engine: Engine, batch: int, length: int, seed: int) -> list[list[int]]:
    """Random token ids (content does not change the time of a dense forward), fixed by the seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, engine.tokenizer.vocab_size, (batch, length), generator=gen).tolist()


def decode_bytes_per_step(engine: Engine, mem, batch: int, context: int) -> float:
    """Fewest bytes one decode step must move: every weight once (the embedding table only if tied to the
    output head) plus the KV cache of every sequence at the given context length."""
    weights = mem.weight_bytes
    arch = getattr(engine, "arch", None)
    if arch is not None and not arch.tie_embeddings:
        emb = engine.model.model.embed_tokens.weight
        weights -= emb.numel() * emb.element_size()
    return weights + mem.kv_bytes_per_token * batch * context


def measure(engine: Engine, spec: RunSpec) -> dict[str, float]:
    b, ctx = spec.cfg.bench, spec.cfg.context
    prompts = bench_prompts(engine, b.batch_size, ctx.prompt_len, spec.cfg.seed)
    device = spec.build.torch_device
    cuda = device.type == "cuda"
    memory.reset_peak(device)  # mem.peak_bytes: the benchmark's peak at this batch and context
    for _ in range(b.warmup):
        engine.generate(prompts, ctx.gen_len)
    runs = [engine.generate(prompts, ctx.gen_len) for _ in range(b.iters)]
    prefill = statistics.median(r.prefill_s for r in runs)
    out = {"perf.ttft_ms": prefill * 1e3, "perf.prefill_tok_s": b.batch_size * ctx.prompt_len / prefill,
           "perf.e2e_tok_s": b.batch_size * ctx.gen_len / statistics.median(r.prefill_s + r.decode_s for r in runs)}
    mem = engine.memory()
    if ctx.gen_len > 1:
        tpot = statistics.median(r.decode_s / r.decode_steps for r in runs)
        out |= {"perf.tpot_ms": tpot * 1e3, "perf.decode_tok_s": b.batch_size / tpot}
        if cuda:
            step_bytes = decode_bytes_per_step(engine, mem, b.batch_size, ctx.prompt_len + ctx.gen_len // 2)
            bw = copy_bandwidth(str(device))
            out |= {"perf.step_bytes": step_bytes, "perf.copy_bw_gbs": bw / 1e9,
                    "perf.roofline_frac": step_bytes / bw / tpot}
    out |= {"mem.weight_bytes": mem.weight_bytes, "mem.kv_bytes_per_token": mem.kv_bytes_per_token,
            "mem.kv_bytes_per_token_formula": mem.kv_bytes_per_token_formula, "mem.peak_bytes": mem.peak_bytes,
            "mem.kv_cache_bytes": mem.kv_bytes_per_token * b.batch_size * (ctx.prompt_len + ctx.gen_len)}
    return out
