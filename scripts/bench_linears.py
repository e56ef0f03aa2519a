"""The decode step's linears, one at a time, side by side in one process: cuBLAS bf16, the Triton GEMV on bf16
weights, torch's tinygemm int4 and the Triton W4A16 (and, for the head, W8A16) kernel over a sweep of launch
configs, and (sm89+, not the head) fp8: the Triton GEMV on e4m3 weights with bf16 activations ("triton fp8w")
or W8A8, x rounded to e4m3 inside the same launch ("triton fp8"), against quantize_rows + torch._scaled_mm ("scaled_mm fp8"). Each variant is first checked against float64 math on fresh random inputs (outputs NaN-poisoned),
then timed as CUDA-graph replays (triton.testing.do_bench_cudagraph, median) over enough weight copies to
defeat the L2. Used by scripts/bench_decode.py (`--tune` makes the fastest config the kernel's default).

    python scripts/bench_linears.py [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvexp.core import fused  # noqa: E402
from kvexp.core.fp8 import FP8_CAPABILITY, Fp8Linear, quantize_weight  # noqa: E402
from kvexp.core.int4 import Int4Linear, rtn_quantize  # noqa: E402
from kvexp.core.kernels import wq_matmul as wq  # noqa: E402

L2_BYTES = 60e6
TOL = 2.0 ** -7  # bf16 outputs: rounding of the output (and of cuBLAS's own accumulation order) stays far below
SWEEP = [wq.MatmulConfig(block_n=bn, waves=w) for bn, w in ((16, 4), (32, 2), (32, 8), (64, 4), (128, 2), (128, 4))]


def linear_shapes(c: dict) -> dict[str, tuple[int, int, bool]]:
    """name -> (weight rows, in_features, gated) of one layer's fused projections and the head (HF config c)."""
    h, i, d = c["hidden_size"], c["intermediate_size"], c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    return {"qkv": (q + 2 * kv, h, False), "o": (h, q, False), "gate_up": (2 * i, h, True),
            "down": (h, i, False), "head": (c["vocab_size"], h, False)}


def _check(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.isnan().any():
        return float("inf")
    return ((out.double() - ref).norm() / ref.norm()).item()


def _time_us(fn, copies: int) -> float:
    import triton

    fn(0)  # compile, allocate split-K counters and workspaces outside the graph
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(lambda: [fn(r) for r in range(copies)], rep=20,
                                             return_mode="median") * 1e3 / copies


def bench_layer(name: str, rows: int, k: int, gated: bool, m: int, sweep: list, group: int = 128,
                only: tuple = ()) -> list[dict]:
    """Every variant (or those named in only) of one linear at m rows: a dict each with time_us, GB/s
    (weight bytes / time), rel_err."""
    gen = torch.Generator(device="cuda").manual_seed(rows * 7 + k + m)
    dense_bytes = rows * k * 2
    copies = max(1, min(64, int(3 * L2_BYTES / (dense_bytes / 4)) + 1))
    w = [torch.randn(rows, k, device="cuda", generator=gen).mul_(0.02).bfloat16() for _ in range(copies)]
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    packed = {4: [rtn_quantize(wi, group, 4) for wi in w]}
    if name == "head":
        packed[8] = [rtn_quantize(wi, group, 8) for wi in w]
    packed = {b: [(q, s.bfloat16()) for q, s in ps] for b, ps in packed.items()}
    silu = fused.compiled().silu_mul

    def ref_of(weight: torch.Tensor) -> torch.Tensor:
        h = x.double() @ weight.double().T
        return F.silu(h[:, :rows // 2]) * h[:, rows // 2:] if gated else h

    out_cols = rows // 2 if gated else rows
    results = []

    def add(variant: str, fn, weight_bytes: float, ref: torch.Tensor, config=None):
        if only and variant not in only:
            return
        try:
            err = _check(fn(0), ref)
            t = _time_us(fn, copies) if err < TOL else float("nan")
        except Exception as e:  # a config that does not compile or launch is a row, not the end of the run
            err, t = float("inf"), float("nan")
            print(f"  {name} m={m} {variant} {config}: {type(e).__name__}: {e}"[:300], flush=True)
        results.append({"layer": name, "rows": rows, "k": k, "m": m, "variant": variant, "time_us": t,
                        "GBps": weight_bytes / t / 1e3 if t == t else float("nan"), "rel_err": err,
                        "config": None if config is None else vars(config)})

    ref_dense = ref_of(w[0])
    add("cublas bf16", (lambda r: silu(F.linear(x, w[r]))) if gated else (lambda r: F.linear(x, w[r])),
        dense_bytes, ref_dense)
    for cfg in sweep:
        add("triton bf16", lambda r, c=cfg: wq.wq_matmul(x, w[r], None, wq.dense_tile(k), 16, gated=gated, config=c),
            dense_bytes, ref_dense, cfg)
    for bits, ps in packed.items():
        ref_q = ref_of(wq.dequantize_ref(*ps[0], group, bits))
        q_bytes = ps[0][0].numel() * ps[0][0].element_size() + ps[0][1].numel() * 2
        if bits == 4:
            tg = []
            for q, s in ps:
                layer = Int4Linear(q, s, group)
                tg.append(layer if layer.prepare_tinygemm() else None)
            if tg[0] is not None:
                add("tinygemm int4", (lambda r: silu(tg[r](x))) if gated else (lambda r: tg[r](x)), q_bytes, ref_q)
        for cfg in sweep:
            add(f"triton int{bits}", lambda r, c=cfg, b=bits: wq.wq_matmul(x, ps[r][0], ps[r][1], group, b,
                                                                            gated=gated, config=c),
                q_bytes, ref_q, cfg)
            if bits == 4:  # the nibbles through Triton's casts instead of PTX: what the PTX unpack buys
                cvt = dataclasses.replace(cfg or wq.config_for(m, rows, k, 4), int4_asm=False)
                add("triton int4 cvt", lambda r, c=cvt: wq.wq_matmul(x, ps[r][0], ps[r][1], group, 4, gated=gated,
                                                                     config=c),
                    q_bytes, ref_q, cvt)
    if name != "head" and torch.cuda.get_device_capability() >= FP8_CAPABILITY:
        _fp8_variants(add, w, x, gated, silu, ref_of)
    del w, packed
    torch.cuda.empty_cache()
    return [dict(r, out_cols=out_cols) for r in results]


def _fp8_variants(add, w: list, x: torch.Tensor, gated: bool, silu, ref_of) -> None:
    """The fp8 kernels of kvexp.core.fp8 on e4m3 copies of the weights, against their own e4m3 math."""
    quantized = [quantize_weight(wi) for wi in w]
    q_bytes = quantized[0][0].numel() + quantized[0][1].numel() * 4
    w_deq = quantized[0][0].double() * quantized[0][1].double()[:, None]
    for activations, kernel, variant in ((False, "triton", "triton fp8w"), (True, "triton", "triton fp8"),
                                         (True, "scaled_mm", "scaled_mm fp8")):
        layers = [Fp8Linear(q, s, activations) for q, s in quantized]
        for layer in layers:
            layer.prepare(kernel)
        if activations:
            xq, xs = wq.quantize_rows_ref(x)
            h = (xq.double() * xs.double()[:, None]) @ w_deq.T
            ref = F.silu(h[:, :h.shape[1] // 2]) * h[:, h.shape[1] // 2:] if gated else h
        else:
            ref = ref_of(w_deq)
        if gated and kernel == "triton":
            fn = lambda r, ls=layers: ls[r].silu_mul(x)  # noqa: E731
        else:
            fn = (lambda r, ls=layers: silu(ls[r](x))) if gated else (lambda r, ls=layers: ls[r](x))
        add(variant, fn, q_bytes, ref)


def best_of(rows: list[dict]) -> list[dict]:
    """The fastest correct row per (layer, m, variant)."""
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (r["layer"], r["rows"], r["k"], r["m"], r["variant"])
        if r["time_us"] == r["time_us"] and (key not in best or r["time_us"] < best[key]["time_us"]):
            best[key] = r
    return list(best.values())


def install_best(rows: list[dict]) -> dict:
    """Make each (layer shape, bits, row bucket)'s fastest config the kernel's default (wq.CONFIGS)."""
    chosen = {}
    for r in best_of(rows):
        if r["variant"] in ("triton bf16", "triton int4", "triton int8") and r["config"] is not None:
            bits = 16 if r["variant"].endswith("bf16") else int(r["variant"][-1])
            key = (r["rows"], r["k"], bits, wq.row_bucket(r["m"]))
            wq.CONFIGS[key] = wq.MatmulConfig(**r["config"])
            chosen[str(key)] = r["config"]
    return chosen


def bench_shapes(configs: dict[str, dict], ms=(1, 8), sweep=SWEEP, only: tuple = ()) -> list[dict]:
    rows = []
    for model, c in configs.items():
        for name, (n, k, gated) in linear_shapes(c).items():
            for m in ms:
                try:
                    rows += [dict(r, model=model) for r in bench_layer(name, n, k, gated, m, sweep, only=only)]
                except Exception as e:  # out of memory, say: this layer's rows are missing, the rest run
                    print(f"[linears] {model} {name} m={m}: {type(e).__name__}: {e}"[:300], flush=True)
                    torch.cuda.empty_cache()
    return rows


def main() -> None:
    from bench_decode import SHAPES, table

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="each kernel's default launch config only")
    ap.add_argument("--models", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--only", nargs="*", default=(), help="variants to run, e.g. 'triton int4' 'tinygemm int4'")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    rows = bench_shapes({m: SHAPES[m] for m in args.models}, sweep=[None] if args.quick else SWEEP,
                        only=tuple(args.only))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(json.dumps(rows))
    print(table(best_of(rows), ["model", "layer", "m", "variant", "time_us", "GBps", "rel_err", "config"]))


if __name__ == "__main__":
    main()
