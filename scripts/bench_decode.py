"""Decode speed on one GPU, side by side in one process (issue: speed on the GPU).

  (a) decode attention: kvexp's Triton kernel (bf16 / int8 / fp8 cache) vs torch SDPA and naive dequant+SDPA
  (b) end-to-end greedy decode tok/s of the native engine for each quant preset, 512 and 32k context,
      batch 1 and 8, with Hugging Face transformers generate (static cache + torch.compile) as the baseline
  (c) peak memory, KV bytes per token, and the fraction of the HBM roofline (bytes per step / copy bandwidth)

Model: Llama-3.2-1B's shape with random weights (speed does not depend on the values). AWQ's speed is measured
with round-to-nearest int4 weights: the same packed format and the same kernel, with no calibration to run.

    python scripts/bench_decode.py [--quick] [--json results.json]

Prints a table per part, then one JSON line with every number.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvexp.bench.perf import copy_bandwidth, measure  # noqa: E402
from kvexp.config import BenchConfig, ContextConfig, validate  # noqa: E402
from kvexp.engines.torch_engine import TorchEngine  # noqa: E402
from kvexp.preflight import compose_job  # noqa: E402

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                tie_word_embeddings=True, rope_theta=500000.0,
                rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
QUANTS = {"fp16": [], "int8kv": [], "fp8kv": [], "awq": ["quant.weights.algo=rtn"],
          "awq_int8kv": ["quant.weights.algo=rtn"]}


def make_checkpoint(out: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvexp.checkpoint import train_tokenizer

    if not (out / "config.json").exists():
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B)).to(torch.bfloat16)
        model.save_pretrained(out)
        train_tokenizer(512).save_pretrained(out)
        del model
        torch.cuda.empty_cache()
    return out


def table(rows: list[dict], cols: list[str]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def tune() -> tuple[list[dict], dict]:
    """Sweep the decode kernel's launch configs per KV format and make the best the process-wide defaults,
    so parts (a) and (b) run what kvexp would ship with these numbers."""
    from kvexp.bench.kernels import best_configs, tune_decode_attention
    from kvexp.core.kernels import decode_attention as da

    rows = tune_decode_attention()
    best = best_configs(rows)
    da.DEFAULT_CONFIGS.update(best)
    return rows, {fmt: dataclasses.asdict(c) for fmt, c in best.items()}


def part_a(quick: bool, sweep: bool = False) -> list[dict]:
    """Decode attention at both head layouts (kvexp.bench.kernels.SHAPES), each row with its model and
    vs_sdpa; sweep: the context sweep's summary rows (slope, break-even) follow, with part "sweep"."""
    from kvexp.bench.kernels import SHAPES, bench_decode_attention, context_sweep, sweep_summary, with_ratios

    rows, swept = [], []
    for model, (hq, hkv, d) in SHAPES.items():
        rows += [dict(r, model=model) for r in bench_decode_attention(
            batch_sizes=(1, 8) if quick else (1, 8, 16), lengths=(4096, 32768), hq=hq, hkv=hkv, d=d)]
        if sweep:
            swept += [dict(r, model=model, part="sweep") for r in sweep_summary(context_sweep(hq, hkv, d))]
    return with_ratios(rows) + swept


def part_b(ckpt: Path, shapes: list[tuple[int, int]], gen: int, iters: int) -> list[dict]:
    rows = []
    for quant, extra in QUANTS.items():
        spec = validate(compose_job([f"model.path={ckpt}", f"quant={quant}", *extra, "model.dtype=bfloat16",
                                     "engine.device=cuda", "eval.fidelity.enabled=false",
                                     "context.prompt_len=32768", "context.gen_len=256"]))
        engine = TorchEngine(spec)
        build = engine.build()
        for ctx, batch in shapes:
            cfg = dataclasses.replace(spec.cfg, context=ContextConfig(name=str(ctx), prompt_len=ctx, gen_len=gen),
                                      bench=BenchConfig(batch_size=batch, warmup=1, iters=iters))
            start = time.perf_counter()
            m = measure(engine, dataclasses.replace(spec, cfg=cfg))
            rows.append({"quant": quant, "ctx": ctx, "batch": batch, "tok_s": m["perf.decode_tok_s"],
                         "tpot_ms": m["perf.tpot_ms"], "ttft_ms": m["perf.ttft_ms"],
                         "roofline": m["perf.roofline_frac"], "step_GB": m["perf.step_bytes"] / 1e9,
                         "weights_GB": m["mem.weight_bytes"] / 1e9, "kv_B_tok": m["mem.kv_bytes_per_token"],
                         "peak_GB": m["mem.peak_bytes"] / 1e9, "build_s": build.build_s,
                         "wall_s": time.perf_counter() - start})
            print(table(rows[-1:], list(rows[-1])), flush=True)
        engine.close()
        del engine
    return rows


def hf_baseline(ckpt: Path, ctx: int, gen: int) -> list[dict]:
    """transformers generate, bf16, batch 1: eager (dynamic cache) and its best path (static cache + compile)."""
    from transformers import AutoModelForCausalLM, CompileConfig

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).cuda().eval()
    model.generation_config.eos_token_id = None
    prompt = torch.randint(0, 512, (1, ctx), device="cuda")
    rows = []
    for name, kwargs in (("hf eager", {}),
                         ("hf static+compile", {"cache_implementation": "static",
                                                "compile_config": CompileConfig(fullgraph=True, mode="reduce-overhead")})):
        def timed(n: int) -> float:
            torch.cuda.synchronize()
            t = time.perf_counter()
            model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kwargs)
            torch.cuda.synchronize()
            return time.perf_counter() - t

        for _ in range(2):
            timed(gen)  # warm-up: compilation and graph capture happen here
        one, full = min(timed(1) for _ in range(2)), min(timed(gen) for _ in range(2))
        rows.append({"engine": name, "ctx": ctx, "batch": 1, "tok_s": (gen - 1) / (full - one)})
        print(table(rows[-1:], list(rows[-1])), flush=True)
    return rows  # the model is freed with this frame


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer shapes and iterations")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--skip", nargs="*", default=[], choices=["a", "b", "hf"])
    ap.add_argument("--tune", action="store_true", help="first sweep the attention kernel's launch configs")
    ap.add_argument("--sweep", action="store_true", help="part (a) adds the context sweep per KV format")
    args = ap.parse_args()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "copy_bw_GBs": copy_bandwidth("cuda") / 1e9, "date": time.strftime("%Y-%m-%d")}
    print(f"{results['device']}  copy bandwidth {results['copy_bw_GBs']:.0f} GB/s (read + write)")
    if args.tune:
        results["tuning"], results["tuned_configs"] = tune()
        print("tuned kernel configs:", json.dumps(results["tuned_configs"]), flush=True)
    if "a" not in args.skip:
        results["attention"] = part_a(args.quick, args.sweep)
        print("\n(a) decode attention\n" + table(results["attention"], list(results["attention"][0])))
    ckpt = make_checkpoint(Path(tempfile.gettempdir()) / "kvexp-llama-1b-shape")
    if "hf" not in args.skip:
        results["hf"] = hf_baseline(ckpt, 512, 128)
    if "b" not in args.skip:
        shapes = [(512, 1), (512, 8), (32768, 1), (32768, 8)]
        results["e2e"] = part_b(ckpt, shapes, gen=64 if args.quick else 128, iters=2 if args.quick else 3)
        print("\n(b, c) end-to-end decode\n" + table(results["e2e"], list(results["e2e"][0])))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
