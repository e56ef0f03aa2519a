"""The performance stage of a run: prefill and decode timings, memory, KV bytes, and the roofline fraction.

Timings are medians over bench.iters generate() calls after bench.warmup calls (which also compile kernels
and capture the CUDA graph); every timed region ends with a device synchronisation. Each timing metric has its
spread beside it, <metric>_min and <metric>_max over the timed calls, so that a ratio between two runs can be
told from noise (kvexp.compare, kvexp.reproduce).
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


def spread(name: str, values: list[float]) -> dict[str, float]:
    """name: the median of values, with name_min and name_max."""
    return {name: statistics.median(values), f"{name}_min": min(values), f"{name}_max": max(values)}


def capacity(mem, device, batch: int, seq_tokens: int) -> dict[str, float]:
    """mem.kv_capacity_tokens and mem.max_batch: what the memory left after the weights and the runtime's working
    memory (the benchmark's peak less its weights and KV cache, at this batch and context) holds of this KV
    format, in tokens and in sequences of the run's context."""
    kv_cache = mem.kv_bytes_per_token * batch * seq_tokens
    working = max(0, mem.peak_bytes - mem.weight_bytes - kv_cache)
    tokens, max_batch = memory.kv_capacity(memory.budget_bytes(device), mem.weight_bytes, working,
                                           mem.kv_bytes_per_token, seq_tokens)
    return {"mem.kv_cache_bytes": kv_cache, "mem.working_bytes": working, "mem.kv_capacity_tokens": tokens,
            "mem.max_batch": max_batch}


def measure(engine: Engine, spec: RunSpec) -> dict[str, float]:
    b, ctx = spec.cfg.bench, spec.cfg.context
    prompts = bench_prompts(engine, b.batch_size, ctx.prompt_len, spec.cfg.seed)
    device = spec.build.torch_device
    cuda = device.type == "cuda"
    memory.reset_peak(device)  # mem.peak_bytes: the benchmark's peak at this batch and context
    for _ in range(b.warmup):
        engine.generate(prompts, ctx.gen_len)
    runs = [engine.generate(prompts, ctx.gen_len) for _ in range(b.iters)]
    out = spread("perf.ttft_ms", [r.prefill_s * 1e3 for r in runs])
    out |= spread("perf.prefill_tok_s", [b.batch_size * ctx.prompt_len / r.prefill_s for r in runs])
    out |= spread("perf.e2e_tok_s", [b.batch_size * ctx.gen_len / (r.prefill_s + r.decode_s) for r in runs])
    mem = engine.memory()
    if ctx.gen_len > 1:
        tpots = [r.decode_s / r.decode_steps for r in runs]
        tpot = statistics.median(tpots)
        out |= spread("perf.tpot_ms", [t * 1e3 for t in tpots])
        out |= spread("perf.decode_tok_s", [b.batch_size / t for t in tpots])
        if cuda:
            step_bytes = decode_bytes_per_step(engine, mem, b.batch_size, ctx.prompt_len + ctx.gen_len // 2)
            bw = copy_bandwidth(str(device))
            out |= {"perf.step_bytes": step_bytes, "perf.copy_bw_gbs": bw / 1e9,
                    "perf.roofline_frac": step_bytes / bw / tpot}
    out |= {"mem.weight_bytes": mem.weight_bytes, "mem.kv_bytes_per_token": mem.kv_bytes_per_token,
            "mem.kv_bytes_per_token_formula": mem.kv_bytes_per_token_formula, "mem.peak_bytes": mem.peak_bytes}
    return out | capacity(mem, device, b.batch_size, ctx.prompt_len + ctx.gen_len)
