"""Split-KV flash-decoding attention for one new query token per sequence over a dense, int8, fp8 or int4 cache.

Design after sglang's triton_ops/decode_attention.py (itself from lightllm's gqa_flash_decoding):
stage 1 runs (B, Hkv, num_splits) programs; each reads one slice of one sequence's K and V for one kv
head exactly once and serves all G = Hq/Hkv query heads that share it (rows padded to 16 for tl.dot),
with an online softmax; stage 2 merges the slices by log-sum-exp. Every slice takes an equal,
block-aligned share of its own sequence's length, read on device, so ragged batches balance and the
grid depends only on shapes (CUDA-graph capturable: no host sync, no data-dependent Python).

Quantized K/V are never dequantized in memory: with x = q * scale, scores are (q . k_int) * s_k[t] *
sm_scale and the probabilities are multiplied by s_v[t] before the P @ V dot (int8 and e4m3 values are
exact in fp16/bf16, so the dots see exact inputs). Static per-head scales fold into sm_scale and the
output. Softmax runs in base 2 (exp2) with sm_scale * log2(e) folded in; accumulation is fp32.

Quantized tiles reach the dots either through Triton's casts to the queries' dtype or through inline PTX
that builds float16 from the bits (KernelConfig.dequant, DEQUANT_MODES says what each costs where); the
float16 dots then see queries normalized per row, so bf16 queries neither overflow nor lose bits. Each
format's default config picks the mode measured faster at its head dim.

Stage 1's launch is a KernelConfig; DEFAULT_CONFIGS holds one per format, and
kvexp.bench.kernels.tune_decode_attention measures the alternatives on the GPU at hand.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import torch

from kvexp.core.kernels import pdl, require_triton
from kvexp.core.kernels.ptx import int4_halves_f16, wait_for_producer
from kvexp.core.kernels.kv_write import DYNAMIC, FMT_CODES, MODEL_DTYPES, NO_SCALE, STATIC, scale_mode, scale_strides
from kvexp.core.formats import FORMATS, dequantize

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: keep the reference importable, kernel calls fail with how to install
    from kvexp.core.kernels import _MissingTriton as triton, _MissingTriton as tl

H100_SMS = 132  # the target GPU; also what CPU (interpreter) runs plan for, so they test the same splits
MAX_SPLITS = 256  # bounds stage 2's tile: every slice of a head, MERGE_TILE // MAX_SPLITS columns of it
MERGE_TILE = 4096
MIN_SPLIT_TOKENS = 256  # below this a slice's fixed cost (q load, partial store, merge) dominates its reads
TUNED_HEAD_DIM = 64  # the head dim DEFAULT_CONFIGS are chosen at (Llama-3.2-1B's)
# How quantized tiles reach the dots (KernelConfig.dequant):
#   cvt  K and V converted to the queries' dtype by Triton's casts (int8: byte permutes and HADD2 already);
#        dots in that dtype
#   asm  K and V converted to float16 by inline PTX (_int8_to_f16_asm, _e4m3_to_f16_asm,
#        ptx.int4_halves_f16); float16 dots, queries normalized per row
# The PTX is marked impure on purpose: Triton then converts the tile where it was loaded and hands the
# float16 tile to the dot through shared memory (ldmatrix), instead of hoisting the conversion into the
# dot's operand layout, where 8-bit tiles are read from shared memory a byte pair at a time (ptxas, sm_90,
# triton 3.6, int8 at block_n 128: the loop fell from 931 to 686 instructions and 128 to 108 registers).
# Measured on an H100 (docs/benchmarks.md, 2026-12-02) against SDPA bf16 at B=8, T=32k: fp8 asm 1.47x at
# D 64 (cvt 1.34x) but 1.24x at D 128 (cvt 1.30x); int8 cvt 1.53x / 1.48x (asm 1.47x / 0.90x); int4 asm at
# block_n 128 1.37x / 1.33x (the previous bit-arithmetic path 0.92x / 0.97x). int8 QK^T on the int8 tensor
# cores (queries in one or two int8 digits) measured 1.59x / 1.05x and was dropped.
DEQUANT_MODES = {"cvt": 0, "asm": 1}
# default_config's changes to a format's config at head_dim >= 2 * TUNED_HEAD_DIM (see above and full_blocks)
WIDE_HEAD = {"fp8": {"dequant": "cvt"}, "int4": {"full_blocks": False}}


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """How stage 1 is launched. Every config computes the same attention; they differ in speed and in
    rounding only (float16 dots normalize the V scales whatever norm_v_scale says)."""
    block_n: int  # keys per loop iteration: a power of two >= 16, tl.dot's smallest N
    num_warps: int
    num_stages: int  # cp.async buffers of K/V blocks in flight per program
    k_natural: bool  # load K as stored, [BLOCK_N, D], and transpose it as a dot operand (else a [D, BLOCK_N] load)
    norm_v_scale: bool = True  # scale p * s_v by its block max (needed by fp16 only; bf16 queries may skip it)
    dequant: str = "cvt"  # quantized formats: one of DEQUANT_MODES (dense always reads its tiles as they are)
    # Blocks wholly inside the slice loaded and scored without masks, the slice's partial last block apart: 10-24%
    # fewer loop instructions (ptxas, sm_90). On an H200 at T=32k (2026-12-03, against the masked loop, same run):
    # int8 1.04x / 1.01x at D 64 (B 8 / 1), 0.98x / 1.12x at D 128; int4 1.20x / 1.14x at D 64, 0.90x / 1.15x at
    # D 128; fp8 (asm at D 64) 0.69x / 0.77x, (cvt at D 128) 0.97x / 1.06x; dense 1.00x.
    full_blocks: bool = False

    def __post_init__(self):
        if self.block_n < 16 or self.block_n & (self.block_n - 1) or self.num_warps not in (1, 2, 4, 8, 16) \
                or self.num_stages < 1 or self.dequant not in DEQUANT_MODES:
            raise ValueError(f"need block_n a power of two >= 16, num_warps in 1..16 (a power of two), "
                             f"num_stages >= 1 and dequant one of {tuple(DEQUANT_MODES)}, got {self}")

    def __str__(self) -> str:
        return (f"n{self.block_n}w{self.num_warps}s{self.num_stages}" + ("-knat" if self.k_natural else "")
                + ("" if self.norm_v_scale else "-vraw") + f"-{self.dequant}" + ("-full" if self.full_blocks else ""))


# Per format at D = 64: 8-16 KB of K (and of V) per block; with 3 cp.async buffers that is <= 55 KB of
# shared memory and <= 128 registers per program, 4 programs per SM (ptxas, sm_90, triton 3.6).
# block_n, warps, stages and k_natural: the H100 sweep above measured 64 vs 128 and 4 vs 8 warps (128 and 4
# won by 10-60%), k_natural and 2x splits as noise or worse. An earlier H100 tuning (B=1 and 8, T=32k) found
# skipping the V-scale normalization (bf16 queries only) worth 6-7% at B=8 on the bf16 dots of cvt.
DEFAULT_CONFIGS: dict[str, KernelConfig] = {
    "dense": KernelConfig(block_n=64, num_warps=4, num_stages=3, k_natural=False),
    "int8": KernelConfig(block_n=128, num_warps=4, num_stages=3, k_natural=False, norm_v_scale=False,
                         full_blocks=True),
    "fp8": KernelConfig(block_n=128, num_warps=4, num_stages=3, k_natural=False, norm_v_scale=False, dequant="asm"),
    "int4": KernelConfig(block_n=128, num_warps=4, num_stages=3, k_natural=False, dequant="asm", full_blocks=True),
}


@triton.jit
def _unpack_int4(x, ROWS: tl.constexpr, D: tl.constexpr):
    """[ROWS, D/2] uint8 of two nibbles -> [ROWS, D] uint8 codes 0..15, low nibble first (kvexp.core.kv's order)."""
    return tl.reshape(tl.join(x & 0xF, x >> 4), [ROWS, D])


@triton.jit
def _int8_to_f16_asm(x):
    """int8 -> float16 (exact), 4 values in 5 instructions: x ^ 0x80 is the byte x + 128, placed under the
    float16 exponent of 1024 (0x64) by prmt it reads 1024 + x + 128, and one sub.f16x2 of 1152 per 2 values."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b32 u, c;
        xor.b32 u, $2, 0x80808080;
        mov.b32 c, 0x64806480;
        prmt.b32 $0, u, 0x64646464, 0x4140;
        prmt.b32 $1, u, 0x64646464, 0x4342;
        sub.f16x2 $0, $0, c;
        sub.f16x2 $1, $1, c;
        }""", "=r,=r,r", [x], dtype=tl.float16, is_pure=False, pack=4)  # impure: see DEQUANT_MODES


@triton.jit
def _e4m3_to_f16_asm(x):
    """float8_e4m3fn bits (uint8) -> float16 (exact), one cvt.rn.f16x2.e4m3x2 per 2 values (sm_89+)."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b16 a0, a1;
        mov.b32 {a0, a1}, $2;
        cvt.rn.f16x2.e4m3x2 $0, a0;
        cvt.rn.f16x2.e4m3x2 $1, a1;
        }""", "=r,=r,r", [x], dtype=tl.float16, is_pure=False, pack=4)


@triton.jit
def _int4_halves(x, ASM: tl.constexpr):
    """Packed int4 tile -> (even, odd) elements as float16 code - 8. Without ASM (Triton's interpreter runs
    no PTX) the same values from Triton ops."""
    if ASM:
        lo, hi = int4_halves_f16(x)
    else:
        lo, hi = ((x & 0xF).to(tl.int32) - 8).to(tl.float16), ((x >> 4).to(tl.int32) - 8).to(tl.float16)
    return lo, hi


@triton.jit
def _values(x, FMT: tl.constexpr, MODE: tl.constexpr, ASM: tl.constexpr, DT: tl.constexpr):
    """A loaded K or V tile (int8, fp8 - as uint8 bits under asm -, int4 codes as uint8) -> its values,
    exactly, in DT (cvt) or float16 (asm; without ASM, the interpreter's, from Triton casts). One return
    statement: Triton's compiler type-checks every return, even those under a constexpr branch not taken."""
    if FMT == 0:
        y = x
    elif MODE == 1:
        if ASM:
            if FMT == 1:
                y = _int8_to_f16_asm(x)
            else:
                y = _e4m3_to_f16_asm(x)
        elif FMT == 1:
            y = x.to(tl.float16)
        else:
            y = x.to(tl.float8e4nv, bitcast=True).to(tl.float16)
    elif FMT == 3:
        y = (x.to(tl.int32) - 8).to(DT)
    else:
        y = x.to(DT)
    return y


@triton.jit
def _tile(ptr, valid, other, MASKED: tl.constexpr):
    """tl.load of a tile, masked by `valid` (broadcast to ptr's shape) only where MASKED: a slice's partial last
    block, or every block when KernelConfig.full_blocks is off."""
    if MASKED:
        x = tl.load(ptr, mask=valid, other=other)
    else:
        x = tl.load(ptr)
    return x


@triton.jit
def _softmax_step(scores, valid, m, l, k_scale, scale_base, n, s_st, row_scale, SCALES: tl.constexpr,
                  MASKED: tl.constexpr):
    """Raw scores [BLOCK_H, BLOCK_N] -> (p, alpha, m_new, l): scaled, masked, folded into the running max/sum."""
    scores = scores * row_scale[:, None]
    if SCALES == 1:
        scores = scores * _tile(k_scale + scale_base + n * s_st, valid, 0.0, MASKED).to(tl.float32)[None, :]
    if MASKED:
        scores = tl.where(valid[None, :], scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(scores - m_new[:, None])
    return p, alpha, m_new, l * alpha + tl.sum(p, 1)


@triton.jit
def _pv(p, vb, v_scale, scale_base, n, valid, s_st, SCALES: tl.constexpr, NORM_V: tl.constexpr,
        MASKED: tl.constexpr):
    """p [BLOCK_H, BLOCK_N] fp32 @ vb [BLOCK_N, X] (values, dot dtype) with per-token V scales -> fp32."""
    if SCALES == 1:
        vs = _tile(v_scale + scale_base + n * s_st, valid, 0.0, MASKED).to(tl.float32)
        if NORM_V:
            # p * s_v goes through the dot in fp16, which would flush it to subnormals when V is small
            # (s_v ~ 1e-5), so the scales enter relative to their block max, which multiplies back in fp32.
            vs_max = tl.max(vs, 0)
            pv = tl.dot((p * (vs / vs_max)[None, :]).to(vb.dtype), vb) * vs_max
        else:  # bf16 has fp32's exponent range: p * s_v rounds like p alone, with no block max to reduce
            pv = tl.dot((p * vs[None, :]).to(vb.dtype), vb)
    else:
        pv = tl.dot(p.to(vb.dtype), vb)
    return pv


@triton.jit
def _attend_block(qv, k_base, v_base, k_scale, v_scale, scale_base, n, end, d, m, l, acc, row_scale,
                  s_kt, s_vt, s_st, D: tl.constexpr, BLOCK_N: tl.constexpr, FMT: tl.constexpr,
                  MODE: tl.constexpr, ASM: tl.constexpr, SCALES: tl.constexpr, K_NATURAL: tl.constexpr,
                  NORM_V: tl.constexpr, MASKED: tl.constexpr):
    """One BLOCK_N slice of keys/values folded into the online softmax state (m, l, acc) of all rows
    (MASKED: positions from `end` on are not read and count for nothing).
    qv [BLOCK_H, D] in the dot dtype; n [BLOCK_N] positions; d [D] (int4: [D/2] bytes); m, l [BLOCK_H] fp32
    (base-2 max, sum); acc [BLOCK_H, D] fp32; row_scale [BLOCK_H] fp32 multiplies the raw scores."""
    valid = n < end
    if FMT == 3:  # packed rows are loaded as stored and unpacked to [BLOCK_N, D]
        kb = _unpack_int4(_tile(k_base + n[:, None] * s_kt + d[None, :], valid[:, None], 8, MASKED), BLOCK_N, D)
        scores = tl.dot(qv, tl.trans(_values(kb, FMT, MODE, ASM, qv.dtype)))
    elif K_NATURAL:  # the tile as stored (rows of D contiguous values), transposed as a dot operand
        kb = _tile(k_base + n[:, None] * s_kt + d[None, :], valid[:, None], 0.0, MASKED)  # [BLOCK_N, D]
        scores = tl.dot(qv, tl.trans(_values(kb, FMT, MODE, ASM, qv.dtype)))
    else:
        kt = _tile(k_base + n[None, :] * s_kt + d[:, None], valid[None, :], 0.0, MASKED)  # [D, BLOCK_N]
        scores = tl.dot(qv, _values(kt, FMT, MODE, ASM, qv.dtype))
    p, alpha, m_new, l = _softmax_step(scores, valid, m, l, k_scale, scale_base, n, s_st, row_scale, SCALES, MASKED)
    if FMT == 3:
        vb = _unpack_int4(_tile(v_base + n[:, None] * s_vt + d[None, :], valid[:, None], 8, MASKED), BLOCK_N, D)
    else:
        vb = _tile(v_base + n[:, None] * s_vt + d[None, :], valid[:, None], 0.0, MASKED)  # [BLOCK_N, D]
    vb = _values(vb, FMT, MODE, ASM, qv.dtype)
    return m_new, l, acc * alpha[:, None] + _pv(p, vb, v_scale, scale_base, n, valid, s_st, SCALES, NORM_V, MASKED)


@triton.jit
def _attend_block_int4(qe, qo, k_base, v_base, k_scale, v_scale, scale_base, n, end, dh, m, l, acc_e, acc_o,
                       row_scale, s_kt, s_vt, s_st, ASM: tl.constexpr, SCALES: tl.constexpr,
                       K_NATURAL: tl.constexpr, NORM_V: tl.constexpr, MASKED: tl.constexpr):
    """_attend_block for int4 under asm, with the head dim split into even and odd elements (the low and
    high nibbles of each byte) so no tile is interleaved: q . k = qe . k_even + qo . k_odd, and the output's
    even and odd elements accumulate apart (acc_e, acc_o [BLOCK_H, D/2]). dh [D/2] byte offsets."""
    valid = n < end
    if K_NATURAL:
        ke, ko = _int4_halves(_tile(k_base + n[:, None] * s_kt + dh[None, :], valid[:, None], 0x88, MASKED), ASM)
        ke, ko = tl.trans(ke), tl.trans(ko)
    else:
        ke, ko = _int4_halves(_tile(k_base + n[None, :] * s_kt + dh[:, None], valid[None, :], 0x88, MASKED), ASM)
    scores = tl.dot(qe, ke) + tl.dot(qo, ko)
    p, alpha, m_new, l = _softmax_step(scores, valid, m, l, k_scale, scale_base, n, s_st, row_scale, SCALES, MASKED)
    ve, vo = _int4_halves(_tile(v_base + n[:, None] * s_vt + dh[None, :], valid[:, None], 0x88, MASKED), ASM)
    acc_e = acc_e * alpha[:, None] + _pv(p, ve, v_scale, scale_base, n, valid, s_st, SCALES, NORM_V, MASKED)
    acc_o = acc_o * alpha[:, None] + _pv(p, vo, v_scale, scale_base, n, valid, s_st, SCALES, NORM_V, MASKED)
    return m_new, l, acc_e, acc_o


@triton.jit
def _query_rows(q, b, s_qb, s_qh, heads, rows, cols, G: tl.constexpr):
    return tl.load(q + b * s_qb + heads[:, None] * s_qh + cols[None, :], mask=rows[:, None] < G, other=0.0)


@triton.jit
def _row_amax(x):
    """Max magnitude of each fp32 row (1 for an all-zero row, a padding row among them)."""
    amax = tl.max(tl.abs(x), 1)
    return tl.where(amax > 0.0, amax, 1.0)


@triton.jit
def _store_part(part_out, part_lse, b, heads, rows, split, cols, acc, m, l, s_pb, s_ph, s_ps, s_lb, s_lh,
                G: tl.constexpr, STORE_LSE: tl.constexpr):
    nonempty = l > 0.0
    out = acc / tl.where(nonempty, l, 1.0)[:, None]
    tl.store(part_out + b * s_pb + heads[:, None] * s_ph + split * s_ps + cols[None, :], out, mask=rows[:, None] < G)
    if STORE_LSE:
        lse = tl.where(nonempty, m + tl.log2(tl.where(nonempty, l, 1.0)), float("-inf"))
        tl.store(part_lse + b * s_lb + heads * s_lh + split, lse, mask=rows < G)


@triton.jit
def _split_kernel(q, k, v, k_scale, v_scale, lengths, part_out, part_lse, qk_scale, num_splits,
                  s_qb, s_qh, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_sb, s_sh, s_st,
                  s_pb, s_ph, s_ps, s_lb, s_lh,
                  G: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                  FMT: tl.constexpr, MODE: tl.constexpr, ASM: tl.constexpr, SCALES: tl.constexpr,
                  K_NATURAL: tl.constexpr, NORM_V: tl.constexpr, FULL_BLOCKS: tl.constexpr, PDL: tl.constexpr):
    """Stage 1, grid (B, Hkv, num_splits): normalized partial output [G, D] and base-2 lse [G] of one
    slice for the G query heads of one kv head. An empty slice stores lse = -inf and zeros. Under asm
    (MODE 1) the dots are float16: each query row is divided by its max magnitude (11 significant bits,
    and no overflow for bf16 queries) and the max moves into the scores' row factor."""
    wait_for_producer(PDL)
    b = tl.program_id(0).to(tl.int64)  # int64: cache offsets pass 2^31 at long context
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    length = tl.load(lengths + b)
    per_split = tl.cdiv(tl.cdiv(length, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, length)
    # FULL_BLOCKS: the blocks before full_end run without masks, then the partial one masked; else all masked
    full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N if FULL_BLOCKS else end

    rows = tl.arange(0, BLOCK_H)
    heads = kvh * G + rows
    scale_base = b * s_sb + kvh * s_sh  # static scales come with s_sb = s_st = 0
    k_base, v_base = k + b * s_kb + kvh * s_kh, v + b * s_vb + kvh * s_vh
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    if FMT == 3 and MODE == 1:  # int4 under asm: the head dim in even and odd halves
        dh = tl.arange(0, D // 2)
        qe = _query_rows(q, b, s_qb, s_qh, heads, rows, 2 * dh, G).to(tl.float32)
        qo = _query_rows(q, b, s_qb, s_qh, heads, rows, 2 * dh + 1, G).to(tl.float32)
        amax = tl.maximum(_row_amax(qe), _row_amax(qo))
        qe, qo = (qe / amax[:, None]).to(tl.float16), (qo / amax[:, None]).to(tl.float16)
        row_scale = amax * qk_scale
        if SCALES == 2:
            row_scale = row_scale * tl.load(k_scale + scale_base)
        acc_e = tl.zeros([BLOCK_H, D // 2], tl.float32)
        acc_o = tl.zeros([BLOCK_H, D // 2], tl.float32)
        for n0 in range(start, full_end, BLOCK_N):
            m, l, acc_e, acc_o = _attend_block_int4(
                qe, qo, k_base, v_base, k_scale, v_scale, scale_base, n0 + tl.arange(0, BLOCK_N), end, dh, m, l,
                acc_e, acc_o, row_scale, s_kt, s_vt, s_st, ASM, SCALES, K_NATURAL, NORM_V, not FULL_BLOCKS)
        if FULL_BLOCKS and full_end < end:
            m, l, acc_e, acc_o = _attend_block_int4(
                qe, qo, k_base, v_base, k_scale, v_scale, scale_base, full_end + tl.arange(0, BLOCK_N), end, dh, m,
                l, acc_e, acc_o, row_scale, s_kt, s_vt, s_st, ASM, SCALES, K_NATURAL, NORM_V, True)
        if SCALES == 2:
            acc_e, acc_o = acc_e * tl.load(v_scale + scale_base), acc_o * tl.load(v_scale + scale_base)
        _store_part(part_out, part_lse, b, heads, rows, split, 2 * dh, acc_e, m, l, s_pb, s_ph, s_ps, s_lb, s_lh,
                    G, True)
        _store_part(part_out, part_lse, b, heads, rows, split, 2 * dh + 1, acc_o, m, l, s_pb, s_ph, s_ps, s_lb,
                    s_lh, G, False)
    else:
        d = tl.arange(0, D)
        qv = _query_rows(q, b, s_qb, s_qh, heads, rows, d, G)
        if MODE == 1 and FMT != 0:
            amax = _row_amax(qv.to(tl.float32))
            qv = (qv.to(tl.float32) / amax[:, None]).to(tl.float16)
            row_scale = amax * qk_scale
        else:
            row_scale = tl.zeros([BLOCK_H], tl.float32) + qk_scale
        if SCALES == 2:
            row_scale = row_scale * tl.load(k_scale + scale_base)
        acc = tl.zeros([BLOCK_H, D], tl.float32)
        dk = tl.arange(0, D // 2) if FMT == 3 else d
        for n0 in range(start, full_end, BLOCK_N):
            m, l, acc = _attend_block(qv, k_base, v_base, k_scale, v_scale, scale_base, n0 + tl.arange(0, BLOCK_N),
                                      end, dk, m, l, acc, row_scale, s_kt, s_vt, s_st, D, BLOCK_N, FMT, MODE, ASM,
                                      SCALES, K_NATURAL, NORM_V, not FULL_BLOCKS)
        if FULL_BLOCKS and full_end < end:
            m, l, acc = _attend_block(qv, k_base, v_base, k_scale, v_scale, scale_base,
                                      full_end + tl.arange(0, BLOCK_N), end, dk, m, l, acc, row_scale, s_kt, s_vt,
                                      s_st, D, BLOCK_N, FMT, MODE, ASM, SCALES, K_NATURAL, NORM_V, True)
        if SCALES == 2:
            acc = acc * tl.load(v_scale + scale_base)
        _store_part(part_out, part_lse, b, heads, rows, split, d, acc, m, l, s_pb, s_ph, s_ps, s_lb, s_lh, G, True)


@triton.jit
def _merge_kernel(part_out, part_lse, out, num_splits, s_pb, s_ph, s_ps, s_lb, s_lh, s_ob, s_oh,
                  BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    """Stage 2, grid (B, Hq, D / BLOCK_D): out = sum_s 2^(lse_s - max) * part_s / sum_s 2^(lse_s - max) over
    BLOCK_D columns of the head dim. Every slice's part is loaded as one [BLOCK_S, BLOCK_D] tile, so a
    program's loads are all in flight at once; a loop over chunks of slices waits on each chunk in turn, and at
    B=1 on Qwen2.5-1.5B's 12 heads (12 programs) that wait was what capped the useful number of slices."""
    wait_for_producer(PDL)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    s = tl.arange(0, BLOCK_S)
    live = s < num_splits
    lse = tl.load(part_lse + b * s_lb + h * s_lh + s, mask=live, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))  # empty slices: 2^-inf = 0
    parts = tl.load(part_out + b * s_pb + h * s_ph + s[:, None] * s_ps + d[None, :], mask=live[:, None], other=0.0)
    o = tl.sum(w[:, None] * parts, 0) / tl.sum(w, 0)
    tl.store(out + b * s_ob + h * s_oh + d, o.to(out.dtype.element_ty))


def _merge_tile(splits: int, head_dim: int) -> tuple[int, int]:
    """Stage 2's (BLOCK_S, BLOCK_D): every slice, and as many columns as keep the tile within MERGE_TILE
    values (32 fp32 registers a thread at 4 warps)."""
    block_s = max(16, triton.next_power_of_2(splits))
    return block_s, max(16, min(head_dim, MERGE_TILE // block_s))


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_scale: Optional[torch.Tensor],
           v_scale: Optional[torch.Tensor], lengths: torch.Tensor, fmt: str) -> int:
    """Validate shapes, dtypes and layouts (never values: that would sync); return the scale mode."""
    if q.ndim != 3 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"q must be [B, Hq, D] and k, v [B, Hkv, Tmax, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    (B, hq, D), (_, hkv, tmax, width) = q.shape, k.shape
    packed = fmt in FORMATS and FORMATS[fmt].packed  # int4: two values per byte, [B, Hkv, Tmax, D/2]
    if k.shape[0] != B or width != (D // 2 if packed else D) or hq % hkv or D & (D - 1) \
            or not (32 if packed else 16) <= D <= 256:
        raise ValueError(f"need matching B and D (int4: k, v [B, Hkv, Tmax, D/2]), Hq % Hkv == 0 and D a power "
                         f"of two in [16, 256] ([32, 256] for int4); got q {tuple(q.shape)}, k {tuple(k.shape)}")
    mode = scale_mode(fmt, k_scale, v_scale, hkv)
    storage = q.dtype if fmt == "dense" else FORMATS[fmt].storage
    if k.dtype != storage or v.dtype != storage:
        raise ValueError(f"fmt {fmt!r} with {q.dtype} queries needs {storage} k and v, got {k.dtype}, {v.dtype}")
    if mode == DYNAMIC and (k_scale.shape != (B, hkv, tmax) or v_scale.shape != (B, hkv, tmax)):
        raise ValueError(f"dynamic scales must be [B, Hkv, Tmax]={[B, hkv, tmax]}, got {tuple(k_scale.shape)}")
    if lengths.shape != (B,) or lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lengths must be [B]=[{B}] int32/int64, got {tuple(lengths.shape)} {lengths.dtype}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k and v must be contiguous in the head dim")
    return mode


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return H100_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_num_splits(batch: int, kv_heads: int, max_len: int, device: torch.device) -> int:
    """Slices per sequence: as many stage-1 programs as fit on the GPU at once (4 per SM: ncu shows ~128
    registers and ~39 KB of shared memory per program), rounded DOWN: one more slice per sequence would start
    a second, nearly empty wave (measured on an H200 at B=8, T=32k: int8 140 -> 115 us at 8 splits instead of
    9). Small batches at long context still keep every SM streaming (H200, B=1, T=32k, Qwen2.5-1.5B's 2 kv heads,
    int8: 64 slices 21.1 us, 128 14.5, since stage 2 reads all slices at once); no slice is shorter than
    MIN_SPLIT_TOKENS of the cache's capacity."""
    want = 4 * _sm_count(device) // (batch * kv_heads)
    return max(1, min(want, -(-max_len // MIN_SPLIT_TOKENS), MAX_SPLITS))


def default_config(fmt: str, head_dim: int) -> KernelConfig:
    """DEFAULT_CONFIGS[fmt]; at other head dims block_n is rescaled (within 16..128) so that a K or V
    block keeps its size in bytes, and with it the shared memory and registers it was tuned with, and from
    twice TUNED_HEAD_DIM on, WIDE_HEAD's fields replace the format's."""
    config = DEFAULT_CONFIGS[fmt]
    if head_dim == TUNED_HEAD_DIM:
        return config
    config = dataclasses.replace(config, block_n=min(128, max(16, config.block_n * TUNED_HEAD_DIM // head_dim)))
    if head_dim >= 2 * TUNED_HEAD_DIM and fmt in WIDE_HEAD:
        config = dataclasses.replace(config, **WIDE_HEAD[fmt])
    return config


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_scale: Optional[torch.Tensor],
                     v_scale: Optional[torch.Tensor], lengths: torch.Tensor, sm_scale: float, fmt: str,
                     num_splits: Optional[int] = None, out: Optional[torch.Tensor] = None,
                     config: Optional[KernelConfig] = None) -> torch.Tensor:
    """Attention of one new token per sequence over its first lengths[b] cache positions (Triton).

    q: [B, Hq, D] float16/bfloat16. k, v: [B, Hkv, Tmax, D], fmt "dense" (q's dtype), "int8" (torch.int8),
    "fp8" (torch.float8_e4m3fn) or "int4" ([B, Hkv, Tmax, D/2] torch.uint8, two codes per byte, low nibble
    first, x = (code - 8) * scale: kvexp.core.kv's layout); query head i reads kv head i // (Hq / Hkv). k_scale, v_scale: None
    (dense), dynamic [B, Hkv, Tmax] bfloat16 or static [Hkv] float32 (x = q * scale). lengths: [B]
    int32/int64 on q's device, each in [1, Tmax] (not checked: that would sync). sm_scale: score scale,
    usually D ** -0.5. num_splits: slices per sequence, default default_num_splits(). out: optional
    [B, Hq, D] buffer in q's dtype, contiguous in D, to write into (a CUDA graph's static output).
    config: stage 1's launch, default default_config(fmt, D); float16 dots (fp16 queries, dequant 'asm')
    normalize V scales whatever its norm_v_scale says. Returns out (new when not given): [B, Hq, D] in q's dtype.
    """
    mode = _check(q, k, v, k_scale, v_scale, lengths, fmt)
    if q.dtype not in MODEL_DTYPES:
        raise ValueError(f"q must be float16 or bfloat16 for the kernel, got {q.dtype}")
    require_triton(triton, q, _split_kernel)
    (B, hq, D), (_, hkv, tmax, _) = q.shape, k.shape
    splits = default_num_splits(B, hkv, tmax, q.device) if num_splits is None else num_splits
    if not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {splits}")
    part_out = torch.empty(B, hq, splits, D, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(B, hq, splits, dtype=torch.float32, device=q.device)
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} contiguous in D, got {tuple(out.shape)} {out.dtype}")
    group = hq // hkv
    config = default_config(fmt, D) if config is None else config
    if fmt == "int4" and (config.block_n < 32 or config.num_warps < 2):
        # measured wrong on an H200 (relative error 1.5 at block_n 16 with 1 warp, tests/test_kernels.py,
        # 2026-12-02) while the interpreter passes: refused until the cause is found on a GPU
        raise ValueError(f"fmt 'int4' needs block_n >= 32 and num_warps >= 2, got {config}")
    dequant = "cvt" if fmt == "dense" else config.dequant
    ptx = dequant == "asm"
    on = pdl(q)
    if fmt == "fp8" and ptx:  # the PTX conversions read e4m3 bits as bytes
        k, v = k.view(torch.uint8), v.view(torch.uint8)
    _split_kernel[(B, hkv, splits)](
        q, k, v, k_scale, v_scale, lengths, part_out, part_lse, sm_scale * math.log2(math.e), splits,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        *scale_strides(mode, k_scale), *part_out.stride()[:3], *part_lse.stride()[:2],
        G=group, BLOCK_H=max(16, triton.next_power_of_2(group)), D=D,
        BLOCK_N=config.block_n, FMT=FMT_CODES[fmt], MODE=DEQUANT_MODES[dequant],
        ASM=ptx and type(_split_kernel).__name__ != "InterpretedFunction",  # the interpreter runs no PTX
        SCALES=mode, K_NATURAL=config.k_natural,
        NORM_V=config.norm_v_scale or q.dtype == torch.float16 or dequant != "cvt", FULL_BLOCKS=config.full_blocks,
        PDL=on, num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=on)
    block_s, block_d = _merge_tile(splits, D)
    _merge_kernel[(B, hq, D // block_d)](
        part_out, part_lse, out, splits, *part_out.stride()[:3], *part_lse.stride()[:2],
        out.stride(0), out.stride(1), BLOCK_S=block_s, BLOCK_D=block_d, PDL=on, num_warps=4, launch_pdl=on)
    return out


def _dequantize_all(x: torch.Tensor, scale: Optional[torch.Tensor], fmt: str, mode: int) -> torch.Tensor:
    """k or v [B, Hkv, Tmax, D] -> float32 through kvexp.core.kv.dequantize (dense: plain upcast)."""
    if mode == NO_SCALE:
        return x.float()
    return dequantize(x, scale[None, :, None] if mode == STATIC else scale, FORMATS[fmt], torch.float32)


def decode_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_scale: Optional[torch.Tensor],
                         v_scale: Optional[torch.Tensor], lengths: torch.Tensor, sm_scale: float,
                         fmt: str) -> torch.Tensor:
    """decode_attention in plain PyTorch (any device, q of any float dtype): K/V dequantized to float32,
    masked softmax in float32. Returns [B, Hq, D] in q's dtype."""
    mode = _check(q, k, v, k_scale, v_scale, lengths, fmt)
    (B, hq, D), (_, hkv, tmax, _) = q.shape, k.shape
    kf, vf = _dequantize_all(k, k_scale, fmt, mode), _dequantize_all(v, v_scale, fmt, mode)
    scores = torch.einsum("bhgd,bhtd->bhgt", q.float().view(B, hkv, hq // hkv, D), kf) * sm_scale
    valid = torch.arange(tmax, device=q.device) < lengths.to(q.device)[:, None]  # [B, Tmax]
    probs = scores.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(-1)
    return torch.einsum("bhgt,bhtd->bhgd", probs, vf).reshape(B, hq, D).to(q.dtype)
