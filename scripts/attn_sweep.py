"""Decode-attention variants side by side on one GPU (issue 13): every dequant mode / launch config of the
kvexp kernel against torch SDPA bf16, at both head layouts, B 1 and 8, T 32k. Each variant is first checked
against decode_attention_ref with ragged lengths and a NaN-poisoned output, then timed as
kvexp.bench.kernels times (CUDA graph over cold input copies).

    python scripts/attn_sweep.py [--json FILE] [--budget-s S] [--profile FMT MODEL B T CONFIG NUM_SPLITS]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvexp.bench import kernels as bk  # noqa: E402
from kvexp.core.kernels import decode_attention as da  # noqa: E402

C = da.KernelConfig
VARIANTS = {  # name -> (fmt, config at D 64 (rescaled by default_config's rule at other D), splits factor)
    "dense": ("dense", C(64, 4, 3, False), 1),
    "int8_cvt": ("int8", C(128, 4, 3, False, norm_v_scale=False, dequant="cvt"), 1),
    "int8_f16": ("int8", C(128, 4, 3, False, dequant="f16"), 1),
    "int8_asm": ("int8", C(128, 4, 3, False, dequant="asm"), 1),
    "int8_mma": ("int8", C(128, 4, 3, False, dequant="mma"), 1),
    "int8_mma2": ("int8", C(128, 4, 3, False, dequant="mma2"), 1),
    "int8_mma2_knat": ("int8", C(128, 4, 3, True, dequant="mma2"), 1),
    "int8_mma2_n64": ("int8", C(64, 4, 3, False, dequant="mma2"), 1),
    "int8_mma2_w8": ("int8", C(128, 8, 3, False, dequant="mma2"), 1),
    "int8_mma2_x2": ("int8", C(128, 4, 3, False, dequant="mma2"), 2),
    "int8_mma2_x4": ("int8", C(128, 4, 3, False, dequant="mma2"), 4),
    "int8_asm_x2": ("int8", C(128, 4, 3, False, dequant="asm"), 2),
    "fp8_cvt": ("fp8", C(128, 4, 3, False, norm_v_scale=False, dequant="cvt"), 1),
    "fp8_f16": ("fp8", C(128, 4, 3, False, dequant="f16"), 1),
    "fp8_asm": ("fp8", C(128, 4, 3, False, dequant="asm"), 1),
    "fp8_asm_knat": ("fp8", C(128, 4, 3, True, dequant="asm"), 1),
    "fp8_asm_n64": ("fp8", C(64, 4, 3, False, dequant="asm"), 1),
    "fp8_asm_w8": ("fp8", C(128, 8, 3, False, dequant="asm"), 1),
    "fp8_asm_x2": ("fp8", C(128, 4, 3, False, dequant="asm"), 2),
    "int8_asm_w8": ("int8", C(128, 8, 3, False, dequant="asm"), 1),
    "int4_asm_w8": ("int4", C(64, 8, 3, False, dequant="asm"), 1),
    "int4_bits": ("int4", C(64, 4, 3, False, dequant="bits"), 1),
    "int4_asm": ("int4", C(64, 4, 3, False, dequant="asm"), 1),
    "int4_mma": ("int4", C(64, 4, 3, False, dequant="mma"), 1),
    "int4_mma2": ("int4", C(64, 4, 3, False, dequant="mma2"), 1),
    "int4_mma2_n128": ("int4", C(128, 4, 3, False, dequant="mma2"), 1),
    "int4_asm_n128": ("int4", C(128, 4, 3, False, dequant="asm"), 1),
    "int4_mma2_x2": ("int4", C(64, 4, 3, False, dequant="mma2"), 2),
    "int4_asm_x2": ("int4", C(64, 4, 3, False, dequant="asm"), 2),
}


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (kvexp.bench.perf's, without kvexp.config)."""
    src = torch.randn(1 << 26, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * 4 / sorted(times[2:])[len(times[2:]) // 2]


def scaled(config: da.KernelConfig, d: int) -> da.KernelConfig:
    return config if d == da.TUNED_HEAD_DIM else dataclasses.replace(
        config, block_n=min(128, max(16, config.block_n * da.TUNED_HEAD_DIM // d)))


def case(model: str, batch: int, seq_len: int, names, deadline: float) -> list[dict]:
    hq, hkv, d = bk.SHAPES[model]
    seed = batch * 1_000_003 + seq_len
    fmts = ("dense", "int8", "fp8", "int4")
    full = torch.full((batch,), seq_len, dtype=torch.int32, device="cuda")
    ragged = torch.randint(1, seq_len + 1, (batch,), dtype=torch.int32, device="cuda")
    ragged[0] = seq_len
    sm = d ** -0.5
    q, caches = bk._input_set(batch, seq_len, hq, hkv, d, torch.bfloat16, fmts, seed)
    per_byte = bk._nbytes(*caches["int4"])  # the smallest: copies enough for every format
    sets = [(q, caches)] + [bk._input_set(batch, seq_len, hq, hkv, d, torch.bfloat16, fmts, seed + i)
                            for i in range(1, bk._copies(per_byte + 2 * bk._nbytes(q)))]
    refs = {f: da.decode_attention_ref(q, *caches[f], ragged, sm, f) for f in fmts}
    rows = []
    k, v = caches["dense"][:2]
    nb = lambda f: bk._nbytes(*caches[f]) + 2 * bk._nbytes(q)
    sdpa = [lambda qq=qq, cc=cc: F.scaled_dot_product_attention(qq[:, :, None], cc["dense"][0], cc["dense"][1],
                                                                scale=sm, enable_gqa=True) for qq, cc in sets]
    n_sdpa = bk._copies(nb("dense"))
    t = bk._graph_time_us(sdpa[:n_sdpa])
    base = dict(model=model, batch=batch, seq_len=seq_len)
    rows.append(dict(base, variant="sdpa_gqa", time_us=t, gbps=nb("dense") / t / 1e3, vs_sdpa=1.0, rel_err=0.0))
    sdpa_t = t
    for name in names:
        if time.monotonic() > deadline:
            print(f"[budget] skipping {name} and later at {model} B{batch}", flush=True)
            break
        fmt, config, factor = VARIANTS[name]
        config = scaled(config, d)
        splits = min(da.MAX_SPLITS, factor * da.default_num_splits(batch, hkv, seq_len, q.device))
        row = dict(base, variant=name, config=str(config), num_splits=splits)
        try:
            out = torch.full_like(q, float("nan"))
            da.decode_attention(q, *caches[fmt], ragged, sm, fmt, splits, out=out, config=config)
            err = ((out.float() - refs[fmt].float()).norm() / refs[fmt].float().norm()).item()
            outs = [torch.empty_like(q) for _ in sets]
            fns = [lambda qq=qq, cc=cc, o=o: da.decode_attention(qq, *cc[fmt], full, sm, fmt, splits, out=o, config=config)
                   for (qq, cc), o in zip(sets, outs)][:bk._copies(nb(fmt))]
            t = bk._graph_time_us(fns)
            row.update(time_us=t, gbps=nb(fmt) / t / 1e3, vs_sdpa=sdpa_t / t, rel_err=err, correct=err < 1e-2)
        except Exception as e:
            row.update(time_us=None, error=f"{type(e).__name__}: {e}"[:400])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def profile(fmt, model, batch, seq_len, config_name, splits):
    hq, hkv, d = bk.SHAPES[model]
    config = scaled(VARIANTS[config_name][1], d)
    lengths = torch.full((batch,), seq_len, dtype=torch.int32, device="cuda")
    q, caches = bk._input_set(batch, seq_len, hq, hkv, d, torch.bfloat16, (fmt,), 0)
    for _ in range(3):
        da.decode_attention(q, *caches[fmt], lengths, d ** -0.5, fmt, splits or None, config=config)
    torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    ap.add_argument("--budget-s", type=float, default=240)
    ap.add_argument("--batches", default="8,1")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--profile", nargs=6)
    args = ap.parse_args()
    if args.profile:
        fmt, model, b, t, name, s = args.profile
        profile(fmt, model, int(b), int(t), name, int(s))
        return
    deadline = time.monotonic() + args.budget_s
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, copy_gbps=copy_bandwidth() / 1e9)
    print(json.dumps(result), flush=True)
    rows = []
    names = args.variants.split(",")
    for batch in map(int, args.batches.split(",")):
        for model in bk.SHAPES:
            rows += case(model, batch, 32768, names, deadline)
            result["rows"] = rows
            if args.json:
                args.json.write_text(json.dumps(result, indent=1))
            torch.cuda.empty_cache()
    bk._print_table(rows, ["model", "batch", "variant", "time_us", "vs_sdpa", "gbps", "rel_err", "num_splits", "config"])


if __name__ == "__main__":
    main()
