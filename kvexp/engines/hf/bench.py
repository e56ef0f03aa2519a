"""Decode speed of engine=hf next to engine=torch: same process, same card, same shapes, same harness
(kvexp.bench.perf.measure), so the ratios mean something. For scripts/bench_decode.py, or on its own:

    python -m kvexp.engines.hf.bench --ckpt DIR --engines torch,hf --quants fp16,int8kv --shapes 512x1,32768x8

Prints a table, then one JSON line with every number (and the card, torch and transformers versions).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Sequence

import torch

from kvexp.bench.perf import measure
from kvexp.config import BenchConfig, ContextConfig
from kvexp.engines import engine_class
from kvexp.evaluate import fidelity
from kvexp.preflight import compose_job
from kvexp.resolve import validate


def engine_rows(ckpt: str, shapes: Sequence[tuple[int, int]], gen: int, iters: int = 3,
                engines: Sequence[str] = ("torch", "hf"), quants: Sequence[str] = ("fp16",),
                device: str = "cuda", dtype: str = "bfloat16") -> list[dict]:
    """One row per (engine, quant, (prompt tokens, batch)): decode tok/s, TTFT (ms), peak memory (GB, of that
    shape: measure() resets the CUDA peak first), KV bytes/token, whether hf ran compiled, and fidelity (KL, greedy
    agreement) against the first engine's fp16 on the fidelity prompts at the shortest context. Each engine is
    built once per quant and measured at every shape, one engine on the device at a time; rows print as they come."""
    if quants[0] != "fp16":
        raise ValueError(f"quants must start with fp16, the fidelity reference; got {list(quants)}")
    rows, ref = [], None
    for name in engines:
        for quant in quants:
            spec = validate(compose_job([f"model.path={ckpt}", f"engine={name}", f"quant={quant}",
                                         f"model.dtype={dtype}", f"engine.device={device}",
                                         f"context.prompt_len={max(c for c, _ in shapes)}", f"context.gen_len={gen}"]))
            engine = engine_class(name)(spec)
            build = engine.build()
            try:
                short = ContextConfig(name="fidelity", prompt_len=min(c for c, _ in shapes), gen_len=gen)
                obs = fidelity.observe(engine, dataclasses.replace(spec, cfg=dataclasses.replace(spec.cfg,
                                                                                                  context=short)))
                ref = ref or obs  # the first engine's first quant (fp16) is every row's reference
                fid = fidelity.compare(ref, obs)
                for ctx, batch in shapes:
                    cfg = dataclasses.replace(spec.cfg, context=ContextConfig(name=str(ctx), prompt_len=ctx,
                                                                              gen_len=gen),
                                              bench=BenchConfig(batch_size=batch, warmup=1, iters=iters))
                    start = time.perf_counter()
                    m = measure(engine, dataclasses.replace(spec, cfg=cfg))
                    rows.append({"engine": name, "quant": quant, "ctx": ctx, "batch": batch,
                                 "tok_s": m["perf.decode_tok_s"], "ttft_ms": m["perf.ttft_ms"],
                                 "peak_GB": m["mem.peak_bytes"] / 1e9, "kv_B_tok": m["mem.kv_bytes_per_token"],
                                 "compiled": build.metrics.get("hf.compiled"),  # None: not engine=hf
                                 "fid_kl": fid["fid.kl_mean"], "fid_greedy": fid["fid.greedy_agree"],
                                 "build_s": build.build_s, "wall_s": time.perf_counter() - start})
                    print(table(rows[-1:]), flush=True)
            finally:
                engine.close()
    return rows


def with_ratios(rows: list[dict], peer: str = "hf") -> list[dict]:
    """Each row plus x_hf_tok_s / x_hf_peak: its tok/s and peak memory over the peer engine's at the same quant
    and shape (absent where the peer has no such row)."""
    peers = {(r["quant"], r["ctx"], r["batch"]): r for r in rows if r["engine"] == peer}
    out = []
    for r in rows:
        p = peers.get((r["quant"], r["ctx"], r["batch"]))
        extra = {} if p is None or r is p else {f"x_{peer}_tok_s": r["tok_s"] / p["tok_s"],
                                                f"x_{peer}_peak": r["peak_GB"] / p["peak_GB"]}
        out.append(r | extra)
    return out


def table(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(c for r in rows for c in r))
    cells = [[f"{r[c]:.4g}" if isinstance(r.get(c), float) else "" if r.get(c) is None else str(r[c]) for c in cols]
             for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    return "\n".join(["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
                     + ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells])


def main(argv: Sequence[str] | None = None) -> None:
    import transformers

    ap = argparse.ArgumentParser(prog="python -m kvexp.engines.hf.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True, help="model.path: a local HF checkpoint dir or builtin:tiny")
    ap.add_argument("--engines", default="torch,hf")
    ap.add_argument("--quants", default="fp16")
    ap.add_argument("--shapes", default="512x1,512x8", help="PROMPTxBATCH,...")
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    rows = with_ratios(engine_rows(args.ckpt, shapes, args.gen, args.iters, args.engines.split(","),
                                   args.quants.split(","), args.device, args.dtype))
    print(table(rows))
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(json.dumps({"device": card, "torch": torch.__version__, "transformers": transformers.__version__,
                      "date": time.strftime("%Y-%m-%d"), "rows": rows}))


if __name__ == "__main__":
    main()
