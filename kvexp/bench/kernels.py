"""Decode-attention microbenchmark, context sweep and launch-config tuner on CUDA: torch SDPA, the naive int8
dequantize + SDPA path and the kvexp Triton kernel over dense / int8 / fp8 / int4 caches (quantized ones
both with their default dequantization and with the other mode of KernelConfig.dequant, "_cvt" or "_asm"), at the head layouts
of SHAPES.

    python -m kvexp.bench.kernels [--quick] [--sweep] [--json FILE]

Every method is timed as the engine runs it, inside a CUDA graph (triton.testing.do_bench_cudagraph's
median), so Python launch overhead is not counted. Graph replays do not flush L2 (50-60 MB on H100/H200):
a method whose inputs are smaller than COLD_BYTES gets several independent input sets (different random
data, up to MAX_COPIES) and one graph runs it once over each, so each call finds its inputs evicted and
reads them from HBM; the time per call is the graph's time / copies.
Every method is first checked against decode_attention_ref on set 0; the kernels write into an output
buffer poisoned with NaN, so an element they fail to write cannot pass.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from kvexp.core.kernels.decode_attention import (KernelConfig, decode_attention, decode_attention_ref, default_config,
                                            default_num_splits)
from kvexp.core.formats import FORMATS, dequantize, dynamic_scale, quantize

REL_TOL = 1e-2  # ||out - ref|| / ||ref||: bf16 output rounding plus bf16 probabilities in the P @ V dot
COLD_BYTES = 200e6  # ~4x L2: what one graph walks between two reads of the same input, so they come from HBM
MAX_COPIES = 64  # bounds the inputs built for tiny cases, which then sit partly in L2
REP_MS = 20  # length of do_bench_cudagraph's timed graph (its default)
FORMATS_BENCHED = ("dense", "int8", "fp8", "int4")
SHAPES = {"llama-3.2-1b": (32, 8, 64), "qwen2.5-1.5b": (12, 2, 128)}  # (Hq, Hkv, D) of each model
SWEEP_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
SWEEP_METHODS = ("sdpa_gqa", "kernel_dense", "kernel_int8", "kernel_fp8", "kernel_int4")
# Tuner grid, swept in stages (see tune_decode_attention).
GRID = dict(k_natural=(False, True), block_n=(32, 64, 128), num_warps=(2, 4, 8))
GRID_STAGES, STAGE_ALTERNATIVES, STAGE_TOP = 3, (2, 4), 3


@dataclass
class _Method:
    fmt: str  # the kv format it attends over (selects the reference)
    fn: Callable[[], torch.Tensor]  # -> [B, Hq, D], on input set 0
    nbytes: int  # bytes it must move at least
    out: Optional[torch.Tensor] = None  # the buffer fn writes into, poisoned before the check


def _nbytes(*tensors: Optional[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _copies(nbytes: int) -> int:
    return max(1, min(MAX_COPIES, math.ceil(COLD_BYTES / nbytes)))


def _input_set(batch: int, seq_len: int, hq: int, hkv: int, d: int, dtype: torch.dtype, fmts, seed: int):
    """Random q [B, Hq, D] and {fmt: (k, v, k_scale, v_scale)} for each fmt: dense K/V or their dynamic
    int8 / fp8 / int4 quantization."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, hq, d, device="cuda", dtype=dtype, generator=gen)
    k, v = (torch.randn(batch, hkv, seq_len, d, device="cuda", dtype=dtype, generator=gen) for _ in range(2))
    caches = {}
    for fmt in fmts:
        if fmt == "dense":
            caches[fmt] = (k, v, None, None)
            continue
        f = FORMATS[fmt]
        ks, vs = dynamic_scale(k, f), dynamic_scale(v, f)
        caches[fmt] = (quantize(k, ks, f), quantize(v, vs, f), ks, vs)
    return q, caches


def _methods(q: torch.Tensor, caches: dict, lengths: torch.Tensor, sm_scale: float) -> dict[str, _Method]:
    """Every method on one input set. Bytes: the cache as that method reads it (values + per-token
    scales) once, plus q and out. sdpa_expand reads K/V repeated to every query head (what repeat_kv
    materializes); sdpa_int8_dequant is charged only its int8 input, though it also writes and rereads a
    bf16 copy, so its GB/s is what the int8 cache delivers, comparable with kernel_int8."""
    q4, io = q[:, :, None], 2 * _nbytes(q)
    k, v = caches["dense"][:2]
    group = q.shape[1] // k.shape[1]
    k_exp, v_exp = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    ki, vi, ksi, vsi = caches["int8"]

    def sdpa_int8_dequant() -> torch.Tensor:
        kd = dequantize(ki, ksi, FORMATS["int8"], q.dtype)
        vd = dequantize(vi, vsi, FORMATS["int8"], q.dtype)
        return F.scaled_dot_product_attention(q4, kd, vd, scale=sm_scale, enable_gqa=True)[:, :, 0]

    methods = {
        "sdpa_gqa": _Method("dense", lambda: F.scaled_dot_product_attention(
            q4, k, v, scale=sm_scale, enable_gqa=True)[:, :, 0], _nbytes(k, v) + io),
        "sdpa_expand": _Method("dense", lambda: F.scaled_dot_product_attention(
            q4, k_exp, v_exp, scale=sm_scale)[:, :, 0], _nbytes(k_exp, v_exp) + io),
        "sdpa_int8_dequant": _Method("int8", sdpa_int8_dequant, _nbytes(ki, vi, ksi, vsi) + io),
    }
    for fmt, cache in caches.items():
        base = default_config(fmt, q.shape[-1])
        for suffix, config in ((("", base),) if fmt == "dense" else
                               (("", base), (f"_{_other_mode(base)}", _alternative(base)))):
            out = torch.empty_like(q)
            methods[f"kernel_{fmt}{suffix}"] = _Method(fmt, _kernel_call(q, cache, lengths, sm_scale, fmt, out, config),
                                                       _nbytes(*cache) + io, out)
    return methods


def _other_mode(config: KernelConfig) -> str:
    return "asm" if config.dequant == "cvt" else "cvt"


def _alternative(config: KernelConfig) -> KernelConfig:
    """The config with the dequant mode its format does not ship with (the kernel_<fmt>_<mode> rows)."""
    return dataclasses.replace(config, dequant=_other_mode(config))


def _kernel_call(q, cache, lengths, sm_scale, fmt, out, config=None) -> Callable[[], torch.Tensor]:
    return functools.partial(decode_attention, q, *cache, lengths, sm_scale, fmt, out=out, config=config)


def _graph_time_us(fns: list[Callable[[], torch.Tensor]]) -> float:
    """Median time per call of a CUDA graph that makes each call of fns once, in turn (do_bench_cudagraph
    runs them once outside the capture first, which compiles and warms up)."""
    import triton.testing

    def every_call() -> None:
        for fn in fns:
            fn()

    torch.cuda.synchronize()  # do_bench_cudagraph works on a stream of its own, which would not wait for the inputs
    return triton.testing.do_bench_cudagraph(every_call, rep=REP_MS, return_mode="median") * 1e3 / len(fns)


def _measure(method: _Method, fns: list[Callable[[], torch.Tensor]], ref: torch.Tensor) -> dict:
    """Check set 0's call against its reference (output poisoned first), then time fns in one graph."""
    if method.out is not None:
        method.out.fill_(float("nan"))
    out = method.fn().float()
    rel_err = ((out - ref.float()).norm() / ref.float().norm()).item()  # NaN anywhere -> NaN -> not correct
    time_us = _graph_time_us(fns)
    return dict(kv_format=method.fmt, time_us=time_us, bytes=method.nbytes, gbps=method.nbytes / time_us / 1e3,
                rel_err=rel_err, correct=rel_err < REL_TOL)


def _shape(batch: int, seq_len: int, hq: int, hkv: int, d: int, dtype: torch.dtype) -> dict:
    return dict(batch=batch, seq_len=seq_len, hq=hq, hkv=hkv, head_dim=d, dtype=str(dtype).removeprefix("torch."))


def _bench_case(batch: int, seq_len: int, hq: int, hkv: int, d: int, dtype: torch.dtype,
                names: Optional[tuple[str, ...]] = None) -> list[dict]:
    """Every method (or those in names) at one (batch, seq_len). All sequences use the full seq_len so every
    method does the same work: SDPA has no ragged lengths without an attn_mask, which would rule out its
    flash kernel."""
    seed, fmts = batch * 1_000_003 + seq_len, FORMATS_BENCHED
    lengths = torch.full((batch,), seq_len, dtype=torch.int32, device="cuda")
    sm_scale = d ** -0.5
    q, caches = _input_set(batch, seq_len, hq, hkv, d, dtype, fmts, seed)
    refs = {fmt: decode_attention_ref(q, *cache, lengths, sm_scale, fmt) for fmt, cache in caches.items()}
    per_set = [_methods(q, caches, lengths, sm_scale)]
    n_sets = max(_copies(m.nbytes) for m in per_set[0].values())
    per_set += [_methods(*_input_set(batch, seq_len, hq, hkv, d, dtype, fmts, seed + i), lengths, sm_scale)
                for i in range(1, n_sets)]
    rows = []
    for name, method in per_set[0].items():
        if names is not None and name not in names:
            continue
        fns = [methods[name].fn for methods in per_set[:_copies(method.nbytes)]]
        try:
            measured = _measure(method, fns, refs[method.fmt])
        except Exception as e:  # a variant that fails to compile or launch: its row says why, the others still run
            measured = dict(kv_format=method.fmt, time_us=None, bytes=method.nbytes, gbps=None, rel_err=None,
                            correct=False, error=f"{type(e).__name__}: {e}"[:300])
        row = dict(_shape(batch, seq_len, hq, hkv, d, dtype), method=name, **measured)
        if name.startswith("kernel_"):
            config = default_config(method.fmt, d)
            config = _alternative(config) if name.endswith(("_cvt", "_asm")) else config
            row.update(num_splits=default_num_splits(batch, hkv, seq_len, q.device), config=str(config))
        rows.append(row)
    return rows


def bench_decode_attention(batch_sizes=(1, 8, 16), lengths=(4096, 32768), hq: int = 32, hkv: int = 8, d: int = 64,
                           dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Time decode attention (one query token per sequence) for every (batch, seq_len) on the current GPU.

    Methods: sdpa_gqa (F.scaled_dot_product_attention with enable_gqa=True, the production baseline),
    sdpa_expand (K/V repeated to Hq heads, for reference), sdpa_int8_dequant (kv.dequantize then SDPA), and
    kernel_dense / kernel_int8 / kernel_fp8 / kernel_int4 (kvexp.core.kernels.decode_attention, dynamic
    per-token scales, the default config) and kernel_<fmt>_<mode> (the same with the other dequant mode). Returns one dict per (case, method): batch, seq_len, hq, hkv, head_dim, dtype, method,
    kv_format, time_us (median per call, CUDA graph), bytes (minimum moved), gbps (bytes / time), rel_err
    (vs decode_attention_ref), correct (rel_err < REL_TOL), and num_splits and config for the kernel rows.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("bench_decode_attention needs a CUDA GPU (and triton)")
    rows = []
    for batch in batch_sizes:
        for seq_len in lengths:
            rows += _bench_case(batch, seq_len, hq, hkv, d, dtype)
            torch.cuda.empty_cache()
    return rows


def _kernel_case(fmt: str, batch: int, seq_len: int, hq: int, hkv: int, d: int,
                 dtype: torch.dtype) -> Callable[[KernelConfig], dict]:
    """The kernel over one fmt at one shape, inputs and reference built once: returns config -> row. A config
    that fails to compile or launch (out of shared memory, say) gives a row with its error, correct=False."""
    seed = batch * 1_000_003 + seq_len
    lengths = torch.full((batch,), seq_len, dtype=torch.int32, device="cuda")
    q, caches = _input_set(batch, seq_len, hq, hkv, d, dtype, (fmt,), seed)
    ref = decode_attention_ref(q, *caches[fmt], lengths, d ** -0.5, fmt)
    nbytes = _nbytes(*caches[fmt]) + 2 * _nbytes(q)
    sets = [(q, caches[fmt])] + [(qi, ci[fmt]) for qi, ci in (
        _input_set(batch, seq_len, hq, hkv, d, dtype, (fmt,), seed + i) for i in range(1, _copies(nbytes)))]
    outs = [torch.empty_like(qi) for qi, _ in sets]
    shape = dict(_shape(batch, seq_len, hq, hkv, d, dtype), method=f"kernel_{fmt}", kv_format=fmt,
                 num_splits=default_num_splits(batch, hkv, seq_len, q.device))

    def run(config: KernelConfig) -> dict:
        row = dict(shape, config=str(config), **dataclasses.asdict(config), error=None)
        fns = [_kernel_call(qi, cache, lengths, d ** -0.5, fmt, out, config) for (qi, cache), out in zip(sets, outs)]
        try:
            return dict(row, **_measure(_Method(fmt, fns[0], nbytes, outs[0]), fns, ref))
        except Exception as e:  # any failure (compile, resources, launch) rules the config out; the row says why
            return dict(row, time_us=None, bytes=nbytes, gbps=None, rel_err=None, correct=False,
                        error=f"{type(e).__name__}: {e}"[:300])
    return run


def tune_decode_attention(batch_sizes=(1, 8), length: int = 32768, fmts=("dense", "int8", "fp8"), hq: int = 32,
                          hkv: int = 8, d: int = 64, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Sweep the kernel's launch config per format on the current GPU, each config at every batch size,
    timed as bench_decode_attention times (CUDA graph, cold inputs) and checked against the reference.

    The full grid (GRID x num_stages 2..4) is 54 configs; instead, per format (~50 runs; 90 s for all three
    formats with the default arguments on an H100, compiles included):
      1. every GRID config at num_stages=GRID_STAGES (18, DEFAULT_CONFIGS among them);
      2. the STAGE_TOP fastest of those at each of STAGE_ALTERNATIVES num_stages;
      3. for int8/fp8 with bf16 queries, the fastest so far with norm_v_scale=False.
    Fastest: as best_configs ranks.
    Returns one row per (config, batch): the shape, method, kv_format, num_splits, config (its str) and
    its fields, error (None, or why it failed), time_us, bytes, gbps, rel_err, correct.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("tune_decode_attention needs a CUDA GPU (and triton)")
    rows: list[dict] = []
    for fmt in fmts:
        rows += _tune_format([_kernel_case(fmt, batch, length, hq, hkv, d, dtype) for batch in batch_sizes], fmt, dtype)
        torch.cuda.empty_cache()
    return rows


def _tune_format(cases: list[Callable[[KernelConfig], dict]], fmt: str, dtype: torch.dtype) -> list[dict]:
    """Steps 1-3 of tune_decode_attention for one format, each config run on every case."""
    rows: list[dict] = []

    def sweep(configs) -> None:
        rows.extend([case(config) for config in configs for case in cases])

    sweep(KernelConfig(block_n=n, num_warps=w, num_stages=GRID_STAGES, k_natural=kn)
          for kn, n, w in itertools.product(GRID["k_natural"], GRID["block_n"], GRID["num_warps"]))
    sweep(dataclasses.replace(config, num_stages=s)
          for config in _ranked(rows, fmt)[:STAGE_TOP] for s in STAGE_ALTERNATIVES)
    if fmt != "dense" and dtype == torch.bfloat16:
        sweep(dataclasses.replace(config, norm_v_scale=False) for config in _ranked(rows, fmt)[:1])
    return rows


def _ranked(rows: list[dict], fmt: str) -> list[KernelConfig]:
    """fmt's configs that are correct at every batch size fmt was measured at, by summed time, fastest first."""
    times: dict[KernelConfig, dict[int, float]] = defaultdict(dict)
    failed, batches = set(), set()
    for row in rows:
        if row["kv_format"] != fmt:
            continue
        config = KernelConfig(**{f.name: row[f.name] for f in dataclasses.fields(KernelConfig)})
        batches.add(row["batch"])
        if row["correct"]:
            times[config][row["batch"]] = row["time_us"]
        else:
            failed.add(config)
    usable = [c for c, t in times.items() if c not in failed and t.keys() == batches]
    return sorted(usable, key=lambda c: sum(times[c].values()))


def best_configs(rows: list[dict]) -> dict[str, KernelConfig]:
    """Per kv_format in tune_decode_attention's rows, the config with the lowest time summed over the batch
    sizes among those correct at all of them (a format with none is left out)."""
    fmts = dict.fromkeys(row["kv_format"] for row in rows)
    return {fmt: ranked[0] for fmt in fmts if (ranked := _ranked(rows, fmt))}


def context_sweep(hq: int, hkv: int, d: int, batch_sizes=(1, 8), lengths=SWEEP_LENGTHS, names=SWEEP_METHODS,
                  dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Decode attention time per step against context length: bench_decode_attention's rows for names only."""
    rows = []
    for batch in batch_sizes:
        for seq_len in lengths:
            rows += _bench_case(batch, seq_len, hq, hkv, d, dtype, names)
            torch.cuda.empty_cache()
    return rows


def _fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares (intercept us, slope us per token) of time against context length."""
    n = len(points)
    mx, my = sum(t for t, _ in points) / n, sum(y for _, y in points) / n
    slope = sum((t - mx) * (y - my) for t, y in points) / max(sum((t - mx) ** 2 for t, _ in points), 1e-30)
    return my - slope * mx, slope


def sweep_summary(rows: list[dict], baseline: str = "sdpa_gqa") -> list[dict]:
    """Per (head layout, batch, method) of context_sweep's rows: the slope of time per step in us per 1k
    tokens of context, that slope over the baseline's (bf16 SDPA), and the break-even context as vLLM
    reports it: where the fitted lines cross, the context past which the method is faster than the
    baseline (0 when it is faster at every context, None when its line never gets below the baseline's);
    also the shortest measured context at which it was faster."""
    series: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        if r["time_us"] is None:
            continue
        series[(r["hq"], r["hkv"], r["head_dim"], r["batch"], r["method"])].append((r["seq_len"], r["time_us"]))
    out = []
    for (hq, hkv, d, batch, method), points in series.items():
        ref = dict(series.get((hq, hkv, d, batch, baseline), ()))
        (a, b), (a0, b0) = _fit(points), _fit(sorted(ref.items()))
        if a < a0:
            cross = 0.0 if b <= b0 else None  # faster from the start (and stays so when its slope is no steeper)
        else:
            cross = (a - a0) / (b0 - b) if b < b0 else None
        faster = [t for t, y in sorted(points) if t in ref and y < ref[t]]
        out.append(dict(hq=hq, hkv=hkv, head_dim=d, batch=batch, method=method, slope_us_per_1k=b * 1e3,
                        slope_vs_baseline=b / b0 if b0 else None, intercept_us=a,
                        break_even_tokens=cross, first_faster_measured=faster[0] if faster else None))
    return out


def _print_table(rows: list[dict], cols: list[str]) -> None:
    text = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    cells = [[text(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("\n".join(["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
                    + ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]), flush=True)


def with_ratios(rows: list[dict], baseline: str = "sdpa_gqa") -> list[dict]:
    """rows plus vs_sdpa: the baseline's time over the method's, within each (shape, batch, seq_len)."""
    key = lambda r: (r["hq"], r["hkv"], r["head_dim"], r["batch"], r["seq_len"])
    ref = {key(r): r["time_us"] for r in rows if r["method"] == baseline}
    return [dict(r, vs_sdpa=ref[key(r)] / r["time_us"] if ref.get(key(r)) and r["time_us"] else None) for r in rows]


def prefill_write_times(layers: int = 16, batch: int = 1, n: int = 512, hkv: int = 8, d: int = 64,
                        dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """What one prefill's cache writes cost (n tokens per sequence into every layer), per cache class and
    write path: median ms over CUDA-event-timed repeats, eager as the engine's prefill runs them."""
    from kvexp.core.kv import KVCache, QuantizedKVCache

    kv = [torch.randn(batch, hkv, n, d, device="cuda", dtype=dtype) for _ in range(2)]
    pos = torch.zeros(batch, dtype=torch.int64, device="cuda")
    rows = []
    for fmt in ("dense", "int8", "fp8", "int4"):
        for fused in (False, True):
            args = (layers, batch, hkv, n, d, dtype, "cuda")
            cache = KVCache(*args, fused_write=fused) if fmt == "dense" else \
                QuantizedKVCache(*args, fmt=FORMATS[fmt], fused_write=fused)
            times = []
            for _ in range(12):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for layer in range(layers):
                    cache.write(layer, *kv, pos)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            rows.append(dict(kv_format=fmt, fused=fused, layers=layers, batch=batch, tokens=n,
                             ms=sorted(times[2:])[len(times[2:]) // 2]))
    return rows


def profile_target(fmt: str, model: str, batch: int, seq_len: int, calls: int = 3) -> None:
    """Run the kernel over fmt a few times at one shape: the process to put under ncu."""
    hq, hkv, d = SHAPES[model]
    lengths = torch.full((batch,), seq_len, dtype=torch.int32, device="cuda")
    q, caches = _input_set(batch, seq_len, hq, hkv, d, torch.bfloat16, (fmt,), 0)
    for _ in range(calls):
        decode_attention(q, *caches[fmt], lengths, d ** -0.5, fmt)
    torch.cuda.synchronize()


def main(argv: Optional[list[str]] = None) -> dict:
    """Both head layouts of SHAPES: every method at B 1/8 x T 4k/32k, then (--sweep) the context sweep."""
    import argparse
    import json
    import pathlib

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="batch 8 and T 32k only in the table")
    ap.add_argument("--sweep", action="store_true", help="also the context sweep (1k..32k, batch 1 and 8)")
    ap.add_argument("--json", type=pathlib.Path, help="also write every row here")
    ap.add_argument("--prefill-write", action="store_true", help="also time one prefill's cache writes")
    ap.add_argument("--profile-target", nargs=4, metavar=("FMT", "MODEL", "BATCH", "SEQ_LEN"),
                    help="only run the kernel at one shape (for ncu) and exit")
    args = ap.parse_args(argv)
    if args.profile_target:
        fmt, model, batch, seq_len = args.profile_target
        profile_target(fmt, model, int(batch), int(seq_len))
        return {}
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    save = lambda: args.json and args.json.write_text(json.dumps(result, indent=1))  # after each part: partial runs count
    table, sweep = [], []
    for name, (hq, hkv, d) in SHAPES.items():
        table += [dict(r, model=name) for r in bench_decode_attention(
            (8,) if args.quick else (1, 8), (32768,) if args.quick else (4096, 32768), hq, hkv, d)]
        result["attention"] = with_ratios(table)
        save()
    if args.prefill_write:
        result["prefill_write"] = prefill_write_times()
        save()
        _print_table(result["prefill_write"], list(result["prefill_write"][0]))
    if args.sweep:
        for name, (hq, hkv, d) in SHAPES.items():
            sweep += [dict(r, model=name) for r in context_sweep(hq, hkv, d)]
            result["sweep"] = sweep
            save()
    _print_table(result["attention"], ["model", "batch", "seq_len", "method", "time_us", "vs_sdpa", "gbps",
                                       "rel_err", "correct", "num_splits", "config"])
    if sweep:
        result["sweep_summary"] = sweep_summary(sweep)
        _print_table(result["sweep_summary"], ["hq", "hkv", "head_dim", "batch", "method", "slope_us_per_1k",
                                               "slope_vs_baseline", "intercept_us", "break_even_tokens",
                                               "first_faster_measured"])
    save()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
