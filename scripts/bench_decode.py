"""Decode speed on one GPU, side by side in one process (issues: speed on the GPU; short context at the roofline).

  (a) decode attention: kvexp's Triton kernel (bf16 / int8 / fp8 cache) vs torch SDPA and naive dequant+SDPA
  (k) the step's linears one at a time (scripts/bench_linears.py): cuBLAS bf16, the Triton GEMV, tinygemm int4
      and the Triton W4A16/W8A16 kernel; with --tune the fastest launch config becomes the kernel's default
  (b) end-to-end greedy decode tok/s of the native engine per kernel choice and quant preset, batch 1 and 8,
      with Hugging Face transformers generate (static cache + torch.compile, its best path) as the baseline
  (c) peak memory, KV bytes per token, the fraction of the HBM roofline (bytes per step / copy bandwidth),
      and the ceiling ratio over fp16 that each output-head choice allows
  (p) a kernel-by-kernel profile (torch.profiler) of one decode step of the kept design
  (pdl) with --pdl: each of PDL_QUANTS with programmatic dependent launch off, then on (kvexp.core.kernels.pdl),
      batch 1 and 8 at 512 context, and the ratio on / off
  (fp8) with --fp8: bf16 vs fp8 (e4m3 weights and per-token activations, fp8 KV) vs fp8 weight-only, and fp8
      with torch._scaled_mm for every row count instead of the Triton GEMV, batch 1 and 8, 512 and 32k context

Models: Llama-3.2-1B's and Qwen2.5-1.5B's shapes with random weights (speed does not depend on the values).
AWQ's speed is measured with round-to-nearest int4 weights: the same packed format and the same kernels,
with no calibration to run.

    python scripts/bench_decode.py [--quick] [--tune] [--kv] [--fp8] [--pdl] [--json results.json] [--budget-s S]

Prints a table per part, then one JSON line with every number.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kvexp.bench.perf import copy_bandwidth, measure  # noqa: E402
from kvexp.config import BenchConfig, ContextConfig  # noqa: E402
from kvexp.core.model import CausalLM  # noqa: E402
from kvexp.engines.torch_engine import TorchEngine  # noqa: E402
from kvexp.preflight import compose_job  # noqa: E402
from kvexp.resolve import validate  # noqa: E402

LLAMA_1B = dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                tie_word_embeddings=True, rope_theta=500000.0,
                rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
QWEN_15B = dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                tie_word_embeddings=True, rope_theta=1000000.0)
SHAPES = {"llama-3.2-1b": LLAMA_1B, "qwen2.5-1.5b": QWEN_15B}
QUANTS = {"fp16": [], "int8kv": [], "fp8kv": [], "awq": ["quant.weights.algo=rtn"],
          "awq_int8kv": ["quant.weights.algo=rtn"]}
KV_QUANTS = ("fp16", "int8kv", "fp8kv", "int4kv")  # --kv: the KV formats end to end against fp16
KV_SHAPES = [(512, 1), (32000, 8)]  # TTFT at a short prompt; decode where the cache outweighs the weights
# (b) at 512 context: name -> (quant preset, overrides, dense kernel, packed kernel); the first is the baseline
KERNEL_VARIANTS = {
    "fp16 cublas": ("fp16", [], "cublas", "auto"),
    "fp16 triton": ("fp16", [], "triton", "auto"),
    "awq tinygemm": ("awq", ["quant.weights.algo=rtn"], "cublas", "tinygemm"),
    "awq triton": ("awq", ["quant.weights.algo=rtn"], "triton", "triton"),
    "awq auto": ("awq", ["quant.weights.algo=rtn"], "auto", "auto"),  # what the engine picks
    "awq triton, int8 head": ("awq", ["quant.weights.algo=rtn", "quant.weights.lm_head=int8"], "triton", "triton"),
}
VARIANTS_QUICK = ("fp16 cublas", "fp16 triton", "awq tinygemm", "awq triton", "awq auto")  # --quick: no head variant
FP8_CALIB = ["quant.calib.dataset=builtin", "quant.calib.num_samples=8", "quant.calib.seq_len=256"]  # its static KV
# --fp8: name -> (quant preset, overrides, Fp8Linear kernel, every shape or 512 only); the first is the baseline
# of every ratio. fp8_static and scaled_mm differ from fp8 only in the decode linears (static activation scales,
# _scaled_mm instead of the GEMV), which 512 context shows.
FP8_VARIANTS = {"fp16": ("fp16", [], "auto", True), "fp8": ("fp8", FP8_CALIB, "auto", True),
                "fp8_weights": ("fp8_weights", [], "auto", True),
                "fp8_static": ("fp8_static", FP8_CALIB, "auto", False),
                "fp8 scaled_mm": ("fp8", FP8_CALIB, "scaled_mm", False)}
FP8_SHAPES = [(512, 1), (512, 8), (32000, 1), (32000, 8)]  # 32000: Qwen2.5's 32k positions hold the generation
PDL_QUANTS = {"fp16": ("fp16", []), "awq": ("awq", ["quant.weights.algo=rtn"]), "fp8": ("fp8", FP8_CALIB)}  # --pdl


def make_checkpoint(out: Path, shape: dict) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from kvexp.checkpoint import train_tokenizer

    if not (out / "config.json").exists():
        torch.manual_seed(0)
        kwargs = {k: v for k, v in shape.items() if k != "model_type"}
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(shape["model_type"], **kwargs),
                                                     dtype=torch.bfloat16)
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


@contextmanager
def kernels(dense: str, packed: str):
    """Engines built inside use these linear kernels; packed 'auto' keeps the engine's engine.int4_kernel."""
    original = CausalLM.prepare_kernels
    CausalLM.prepare_kernels = lambda self, int4="auto": original(self, dense, int4 if packed == "auto" else packed)
    try:
        yield
    finally:
        CausalLM.prepare_kernels = original


@contextmanager
def fp8_kernel(kernel: str):
    """Engines built inside run their fp8 linears on this kernel (kvexp.core.fp8.KERNELS)."""
    from kvexp.core.fp8 import Fp8Linear

    original = Fp8Linear.prepare
    Fp8Linear.prepare = lambda self, _kernel="auto", tinygemm_first=True: original(self, kernel)
    try:
        yield
    finally:
        Fp8Linear.prepare = original


def part_fp8(ckpt: Path, gen: int, iters: int, bw: float) -> list[dict]:
    """FP8_VARIANTS at FP8_SHAPES (or their 512-context ones); tok/s and TTFT also as ratios to bf16 (fp16) at
    the same shape, from this run."""
    rows = []
    for name, (quant, extra, kernel, every_shape) in FP8_VARIANTS.items():
        try:
            with fp8_kernel(kernel):
                rows += run_engine(ckpt, name, quant, extra, "auto", "auto",
                                   FP8_SHAPES if every_shape else FP8_SHAPES[:2], gen, iters, bw, False)[0]
        except Exception as e:  # one broken variant is a missing row, not a lost run
            print(f"[fp8] {name}: {type(e).__name__}: {e}"[:400], flush=True)
            torch.cuda.empty_cache()
    base = {(r["ctx"], r["batch"]): r for r in rows if r["variant"] == next(iter(FP8_VARIANTS))}
    for r in rows:
        if (b := base.get((r["ctx"], r["batch"]))) is not None:
            r["vs_fp16"], r["ttft_vs_fp16"] = r["tok_s"] / b["tok_s"], r["ttft_ms"] / b["ttft_ms"]
    return rows


def part_pdl(ckpt: Path, gen: int, iters: int, bw: float) -> list[dict]:
    """PDL_QUANTS at 512 context, batch 1 and 8, each built and measured with programmatic dependent launch off and
    then on; the rows with it on carry vs_pdl_off, from this run."""
    from kvexp.core.kernels import pdl_switch

    rows = []
    for quant, (preset, extra) in PDL_QUANTS.items():
        for on in (False, True):
            try:
                with pdl_switch(on):
                    rows += [dict(r, pdl=on) for r in run_engine(ckpt, quant, preset, extra, "auto", "auto",
                                                                  [(512, 1), (512, 8)], gen, iters, bw, False)[0]]
            except Exception as e:  # one broken variant is a missing row, not a lost run
                print(f"[pdl] {quant}, pdl {on}: {type(e).__name__}: {e}"[:400], flush=True)
                torch.cuda.empty_cache()
    off = {(r["variant"], r["batch"]): r for r in rows if not r["pdl"]}
    for r in rows:
        if r["pdl"] and (r["variant"], r["batch"]) in off:
            r["vs_pdl_off"] = r["tok_s"] / off[r["variant"], r["batch"]]["tok_s"]
    return rows


def step_bytes(engine, batch: int, context: int) -> float:
    """Fewest bytes a decode step moves: every weight once, less the embedding table when the head does not
    share its storage (untied, or a quantized head: only `batch` rows of it are read), plus the KV cache."""
    model, mem = engine.model, engine.memory()
    emb = model.model.embed_tokens.weight
    head = {t.untyped_storage().data_ptr() for t in [*model.lm_head.parameters(), *model.lm_head.buffers()]}
    shared = emb.untyped_storage().data_ptr() in head
    return mem.weight_bytes - (0 if shared else emb.numel() * emb.element_size()) + mem.kv_bytes_per_token * batch * context


def run_engine(ckpt: Path, name: str, quant: str, extra: list, dense: str, packed: str,
               shapes: list[tuple[int, int]], gen: int, iters: int, bw: float, profile: bool) -> tuple[list, list]:
    """One engine, measured at each (context, batch). Returns (rows, profile rows of batch 1 if asked)."""
    spec = validate(compose_job([f"model.path={ckpt}", f"quant={quant}", *extra, "model.dtype=bfloat16", "eval=none",
                                 "engine.device=cuda", "eval.fidelity.enabled=false",
                                 f"context.prompt_len={max(c for c, _ in shapes)}", f"context.gen_len={gen}"]))
    engine = TorchEngine(spec)
    with kernels(dense, packed):
        build = engine.build()
    rows, prof = [], []
    for ctx, batch in shapes:
        cfg = dataclasses.replace(spec.cfg, context=ContextConfig(name=str(ctx), prompt_len=ctx, gen_len=gen),
                                  bench=BenchConfig(batch_size=batch, warmup=1, iters=iters))
        m = measure(engine, dataclasses.replace(spec, cfg=cfg))
        nbytes = step_bytes(engine, batch, ctx + gen // 2)
        rows.append({"variant": name, "ctx": ctx, "batch": batch, "tok_s": m["perf.decode_tok_s"],
                     "tpot_ms": m["perf.tpot_ms"], "ttft_ms": m["perf.ttft_ms"],
                     "roofline": nbytes / bw / (m["perf.tpot_ms"] / 1e3), "step_GB": nbytes / 1e9,
                     "weights_GB": m["mem.weight_bytes"] / 1e9, "kv_B_tok": m["mem.kv_bytes_per_token"],
                     "peak_GB": m["mem.peak_bytes"] / 1e9, "build_s": build.build_s,
                     "kernels": {k: v for k, v in build.metrics.items() if k.startswith("kernels.")}})
        print(table(rows[-1:], [c for c in rows[-1] if c != "kernels"]), flush=True)
        if profile and batch == 1:
            try:
                prof = profile_step(engine, ctx, gen)
            except Exception as e:  # a profiler failure costs the profile, not the run
                print(f"[profile] {name}: {type(e).__name__}: {e}", flush=True)
    engine.close()
    return rows, prof


def profile_step(engine, ctx: int, gen: int, steps: int = 4) -> list[dict]:
    """Kernel by kernel, one decode step at batch 1 (torch.profiler over eager steps of the captured code:
    the same kernels; the graph only removes the launch gaps). Also the sum, to set against the TPOT."""
    loop = engine._decode_loop(1, ctx + gen)
    with torch.inference_mode():  # the loop's buffers are inference tensors
        loop.pos.fill_(ctx)
        loop._step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                loop._step()
            torch.cuda.synchronize()
    kernels_ = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    rows = sorted(({"kernel": e.key[:70], "calls": e.count / steps, "us": e.device_time_total / steps}
                   for e in kernels_), key=lambda r: -r["us"])
    total = sum(r["us"] for r in rows)
    return [dict(r, share=r["us"] / total) for r in rows] + [{"kernel": "TOTAL", "calls": sum(r["calls"] for r in rows),
                                                              "us": total, "share": 1.0}]


def ceilings(c: dict, ctx: int, group: int = 128) -> list[dict]:
    """Bytes per decode step at batch 1 and the speed-up over fp16 they allow, per output-head choice (AWQ
    int4 layers; the embedding table is read only as the head, and only when tied to it)."""
    from bench_linears import linear_shapes

    layers = {n: s for n, s in linear_shapes(c).items() if n != "head"}
    params = c["num_hidden_layers"] * sum(rows * k for rows, k, _ in layers.values())
    head = c["vocab_size"] * c["hidden_size"]
    d = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    kv = 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * d * 2 * ctx
    int_bytes = lambda n, bits: n * bits / 8 + n / group * 2  # codes + bf16 group scales
    fp16 = 2 * params + 2 * head + kv
    rows = [{"weights": "fp16", "lm_head": "bf16", "step_GB": fp16 / 1e9, "ceiling_vs_fp16": 1.0}]
    for name, hb in (("bf16", 2 * head), ("int8", int_bytes(head, 8)), ("int4", int_bytes(head, 4))):
        b = int_bytes(params, 4) + hb + kv
        rows.append({"weights": "awq int4", "lm_head": name, "step_GB": b / 1e9, "ceiling_vs_fp16": fp16 / b})
    return rows


def part_b(ckpt: Path, shapes: list[tuple[int, int]], gen: int, iters: int, bw: float,
           quants: tuple = tuple(QUANTS)) -> list[dict]:
    """Each quant preset with the kernels kvexp picks ('auto'), at the given (context, batch) shapes; tok/s and
    TTFT also as ratios to the first preset's (fp16) at the same shape."""
    rows = []
    for quant in quants:
        extra = QUANTS.get(quant, [])
        rows += run_engine(ckpt, quant, quant, extra, "auto", "auto", shapes, gen, iters, bw, False)[0]
    base = {(r["ctx"], r["batch"]): r for r in rows if r["variant"] == quants[0]}
    for r in rows:
        if (b := base.get((r["ctx"], r["batch"]))) is not None:
            r["vs_fp16"], r["ttft_vs_fp16"] = r["tok_s"] / b["tok_s"], r["ttft_ms"] / b["ttft_ms"]
    return rows


def part_kernels(ckpt: Path, gen: int, iters: int, bw: float, profile: list[str], names) -> tuple[list, dict]:
    """The named KERNEL_VARIANTS at 512 context, batch 1 and 8; tok/s relative to the first (fp16 cuBLAS)."""
    rows, profiles = [], {}
    for name in names:
        quant, extra, dense, packed = KERNEL_VARIANTS[name]
        try:
            r, p = run_engine(ckpt, name, quant, extra, dense, packed, [(512, 1), (512, 8)], gen, iters, bw,
                              name in profile)
        except Exception as e:  # one broken variant is a missing row, not a lost run
            print(f"[variant] {name}: {type(e).__name__}: {e}", flush=True)
            torch.cuda.empty_cache()
            continue
        rows += r
        if p:
            profiles[name] = p
    base = {r["batch"]: r for r in rows if r["variant"] == next(iter(KERNEL_VARIANTS))} or \
        {r["batch"]: r for r in rows if r["variant"].startswith("fp16")}
    fp16 = {r["batch"]: r for r in rows if r["variant"] == "fp16 triton"}
    for r in rows:
        r["vs_fp16_cublas"] = r["tok_s"] / base[r["batch"]]["tok_s"]
        r["ttft_vs_fp16"] = r["ttft_ms"] / base[r["batch"]]["ttft_ms"]
        if r["batch"] in fp16:
            r["vs_fp16_triton"] = r["tok_s"] / fp16[r["batch"]]["tok_s"]
    return rows, profiles


def hf_baseline(ckpt: Path, ctx: int, gen: int) -> list[dict]:
    """engine=hf, bf16, batch 1: transformers generate with its static cache and torch.compile, its best path (the
    engine's own harness, kvexp.engines.hf.bench)."""
    from kvexp.engines.hf.bench import engine_rows

    return engine_rows(str(ckpt), [(ctx, 1)], gen, engines=("hf",))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer shapes and iterations")
    ap.add_argument("--json", type=Path, help="also write the results here (rewritten after every part)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["a", "k", "kernels", "b", "kv", "fp8", "pdl", "hf", "p"])
    ap.add_argument("--models", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--tune", action="store_true", help="first sweep the attention and linear kernels' configs")
    ap.add_argument("--budget-s", type=float, help="skip the parts that would start after this many seconds")
    ap.add_argument("--sweep", action="store_true", help="part (a) adds the context sweep per KV format")
    ap.add_argument("--kv", action="store_true", help="the KV formats end to end against fp16 (KV_SHAPES)")
    ap.add_argument("--fp8", action="store_true", help="bf16 vs fp8 vs fp8 weight-only end to end (FP8_SHAPES)")
    ap.add_argument("--pdl", action="store_true", help="programmatic dependent launch off vs on end to end")
    ap.add_argument("--variants", nargs="*", choices=list(KERNEL_VARIANTS),
                    help="the kernel variants of (b) (default: all; --quick: VARIANTS_QUICK)")
    args = ap.parse_args()
    start = time.perf_counter()
    bw = copy_bandwidth("cuda")
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bw_GBs": bw / 1e9,
               "date": time.strftime("%Y-%m-%d"), "skipped": []}
    print(f"{results['device']}  copy bandwidth {results['copy_bw_GBs']:.0f} GB/s (read + write)")
    gen, iters = (64, 2) if args.quick else (128, 3)

    def go(part: str) -> bool:
        """Run this part unless skipped or past the budget; partial results are saved before each part."""
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        late = args.budget_s is not None and time.perf_counter() - start > args.budget_s
        if late:
            results["skipped"].append(part)
            print(f"[budget] skipping {part}", flush=True)
        return part.split(":")[0] not in args.skip and not late

    if args.tune and go("a"):
        results["tuning"], results["tuned_configs"] = tune()
        print("tuned kernel configs:", json.dumps(results["tuned_configs"]), flush=True)
    if go("a"):
        results["attention"] = part_a(args.quick, args.sweep)
        print("\n(a) decode attention\n" + table(results["attention"], list(results["attention"][0])))
    if go("k"):
        from bench_linears import SWEEP, best_of, bench_shapes, install_best
        sweep = SWEEP if args.tune else [None]  # None: each shape's default config (wq_matmul.config_for)
        results["linears"] = bench_shapes({m: SHAPES[m] for m in args.models}, sweep=sweep)
        if args.tune:
            results["linear_configs"] = install_best(results["linears"])
        print("\n(k) linears, fastest config per variant\n" + table(
            best_of(results["linears"]), ["model", "layer", "m", "variant", "time_us", "GBps", "rel_err", "config"]))
    for model in args.models:
        ckpt = make_checkpoint(Path(tempfile.gettempdir()) / f"kvexp-{model}-shape", SHAPES[model])
        results.setdefault("ceilings", {})[model] = ceilings(SHAPES[model], 512 + gen // 2)
        print(f"\n(c) {model}: bytes per step at 512 context, batch 1\n" + table(results["ceilings"][model],
                                                                                list(results["ceilings"][model][0])))
        if go(f"kernels:{model}"):
            profile = [] if "p" in args.skip else ["fp16 triton", "awq triton", "awq auto"]
            names = args.variants or (VARIANTS_QUICK if args.quick else KERNEL_VARIANTS)
            rows, profiles = part_kernels(ckpt, gen, iters, bw, profile, names)
            results.setdefault("kernels", {})[model], results.setdefault("profile", {})[model] = rows, profiles
            print(f"\n(b) {model}: kernels side by side, 512 context\n" + table(rows, [c for c in rows[0] if c != "kernels"]))
            for name, prof in profiles.items():
                print(f"\n(p) {model}, {name}: one decode step, batch 1\n" + table(prof[:25] + prof[-1:], list(prof[0])))
        if args.kv and go(f"kv:{model}"):
            results.setdefault("kv", {})[model] = rows = part_b(ckpt, KV_SHAPES, gen // 2, iters, bw, KV_QUANTS)
            print(f"\n(kv) {model}: KV formats end to end\n" + table(rows, [c for c in rows[0] if c != "kernels"]))
        if args.fp8 and go(f"fp8:{model}"):
            results.setdefault("fp8", {})[model] = rows = part_fp8(ckpt, gen, iters, bw)
            if rows:
                print(f"\n(fp8) {model}: bf16 vs fp8\n" + table(rows, [c for c in rows[0] if c != "kernels"]))
        if args.pdl and go(f"pdl:{model}"):
            results.setdefault("pdl", {})[model] = rows = part_pdl(ckpt, gen, 3, bw)
            print(f"\n(pdl) {model}: PDL off vs on, 512 context\n" + table(rows, [c for c in rows[0] if c != "kernels"]))
        if not args.quick and model == "llama-3.2-1b" and go(f"b:{model}"):
            results["e2e"] = part_b(ckpt, [(32768, 1), (32768, 8)], gen, iters, bw)
            print("\n(b, c) end-to-end decode, 32k\n" + table(results["e2e"], [c for c in results["e2e"][0] if c != "kernels"]))
    for model in args.models:
        if go(f"hf:{model}"):
            ckpt = Path(tempfile.gettempdir()) / f"kvexp-{model}-shape"
            try:
                results.setdefault("hf", {})[model] = hf_baseline(ckpt, 512, gen)
            except Exception as e:
                print(f"[hf] {model}: {type(e).__name__}: {e}"[:300], flush=True)
    try:
        results["targets"] = targets(results)
    except ValueError as e:  # a variant family with no rows
        results["targets"] = [{"note": f"incomplete: {e}"}]
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(json.dumps(results))
    print("\ntargets (issue 14), H200, this run\n" + table(results["targets"], list(results["targets"][0])))


def targets(results: dict) -> list[dict]:
    """The issue's targets against this run: the better fp16 variant is the baseline of every ratio."""
    out = []
    for model, rows in results.get("kernels", {}).items():
        for batch in (1, 8):
            at = [r for r in rows if r["batch"] == batch]
            fp16 = max((r for r in at if r["variant"].startswith("fp16")), key=lambda r: r["tok_s"])
            awq = max((r for r in at if r["variant"].startswith("awq") and "head" not in r["variant"]),
                      key=lambda r: r["tok_s"])
            hf = results.get("hf", {}).get(model, [{}])[0].get("tok_s", float("nan")) if batch == 1 else float("nan")
            out.append({"model": model, "batch": batch, "fp16": fp16["variant"], "fp16_tok_s": fp16["tok_s"],
                        "fp16_roofline": fp16["roofline"], "goal": 0.70 if batch == 1 else 0.65,
                        "awq": awq["variant"], "awq_tok_s": awq["tok_s"], "awq_vs_fp16": awq["tok_s"] / fp16["tok_s"],
                        "awq_goal": 2.0 if batch == 1 else 1.6, "awq_ttft_vs_fp16": awq["ttft_ms"] / fp16["ttft_ms"],
                        "hf_best_tok_s": hf})
    return out or [{"note": "no end-to-end rows in this run"}]


if __name__ == "__main__":
    main()
