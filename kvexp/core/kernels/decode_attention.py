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

Quantized tiles can become float16 through bit arithmetic (KernelConfig.fast_dequant, see _values) instead
of int->float conversions, which issue at a quarter of the FP32 rate on Hopper; the dots then run in
float16, queries normalized per row so bf16 queries neither overflow nor lose bits. Measured on an H200,
that pays for int4 (its nibbles need unpacking either way) and not for int8/fp8 (DEFAULT_CONFIGS says by
how much), so each format's default config picks its path.

Stage 1's launch is a KernelConfig; DEFAULT_CONFIGS holds one per format, and
kvexp.bench.kernels.tune_decode_attention measures the alternatives on the GPU at hand.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import torch

from kvexp.core.kernels import require_triton
from kvexp.core.kernels.kv_write import DYNAMIC, FMT_CODES, MODEL_DTYPES, NO_SCALE, STATIC, scale_mode, scale_strides
from kvexp.core.formats import FORMATS, dequantize

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: keep the reference importable, kernel calls fail with how to install
    from kvexp.core.kernels import _MissingTriton as triton, _MissingTriton as tl

H100_SMS = 132  # the target GPU; also what CPU (interpreter) runs plan for, so they test the same splits
MAX_SPLITS = 256  # bounds stage 2's [splits] lse vector (its parts are read MERGE_CHUNK slices at a time)
# default_num_splits' cap: on an H200 at B=1, T=32k, Qwen2.5-1.5B heads (2 kv heads) 128 slices took
# 23.0 us against 19.5 at 64 (slices of 256 tokens are mostly fixed cost)
DEFAULT_MAX_SPLITS = 64
MERGE_CHUNK = 16
MIN_SPLIT_TOKENS = 256  # below this a slice's fixed cost (q load, partial store, merge) dominates its reads
TUNED_HEAD_DIM = 64  # the head dim DEFAULT_CONFIGS are chosen at (Llama-3.2-1B's)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """How stage 1 is launched. Every config computes the same attention; they differ in speed only
    (and, for norm_v_scale, in fp16's rounding, which is why fp16 queries always normalize)."""
    block_n: int  # keys per loop iteration: a power of two >= 16, tl.dot's smallest N
    num_warps: int
    num_stages: int  # cp.async buffers of K/V blocks in flight per program
    k_natural: bool  # load K as stored, [BLOCK_N, D], and transpose it as a dot operand (else a [D, BLOCK_N] load)
    norm_v_scale: bool = True  # scale p * s_v by its block max (needed by fp16 only; bf16 queries may skip it)
    fast_dequant: bool = True  # quantized formats: float16 tiles from bit arithmetic, float16 dots (see _values)

    def __post_init__(self):
        if self.block_n < 16 or self.block_n & (self.block_n - 1) or self.num_warps not in (1, 2, 4, 8, 16) \
                or self.num_stages < 1:
            raise ValueError(f"need block_n a power of two >= 16, num_warps in 1..16 (a power of two) and "
                             f"num_stages >= 1, got {self}")

    def __str__(self) -> str:
        return (f"n{self.block_n}w{self.num_warps}s{self.num_stages}" + ("-knat" if self.k_natural else "")
                + ("" if self.norm_v_scale else "-vraw") + ("" if self.fast_dequant else "-cvt"))


# Per format at D = 64: ~8 KB of K (and of V) per block; with 3 cp.async buffers that keeps ~32 KB in
# flight per program at <= ~130 registers and ~40 KB shared memory (ptxas, sm_90, triton 3.6).
DEFAULT_CONFIGS: dict[str, KernelConfig] = {
    "dense": KernelConfig(block_n=64, num_warps=4, num_stages=3, k_natural=False),
    # tune_decode_attention on an H100 (B=1 and 8, T=32k): skipping the V-scale normalization (bf16 queries
    # only; fp16 keeps it) was the one knob that paid, 6-7% at B=8; block/warps/stages/k_natural were noise.
    # On an H200 (2026-12-02, B=8, T=32k, Llama-3.2-1B heads) the bit-arithmetic float16 tiles did not pay for
    # 8-bit formats: int8 150.8 us at block_n 64 and 166 at 128 against 114.8 converting (Triton 3.6 already
    # converts int8 with byte permutes, not I2F), fp8 169 against 133.9. For int4 they did: 201 against 214.
    "int8": KernelConfig(block_n=128, num_warps=4, num_stages=3, k_natural=False, norm_v_scale=False,
                         fast_dequant=False),
    "fp8": KernelConfig(block_n=128, num_warps=4, num_stages=3, k_natural=False, norm_v_scale=False,
                        fast_dequant=False),
    "int4": KernelConfig(block_n=64, num_warps=4, num_stages=3, k_natural=False, fast_dequant=True),
}
FP8_BITS_FACTOR = 256.0  # _values' fast e4m3 tiles hold the value times 2^-8


@triton.jit
def _unpack_int4(x, ROWS: tl.constexpr, D: tl.constexpr):
    """[ROWS, D/2] uint8 of two nibbles -> [ROWS, D] uint8 codes 0..15, low nibble first (kvexp.core.kv's order)."""
    return tl.reshape(tl.join(x & 0xF, x >> 4), [ROWS, D])


@triton.jit
def _values(x, FMT: tl.constexpr, FAST: tl.constexpr, DT: tl.constexpr):
    """A loaded K or V tile (int8, fp8 as uint8 bits, int4 codes as uint8) -> DT, exactly.

    FAST builds float16 from bits with full-rate integer ops instead of I2F/F2F conversions (quarter rate
    on Hopper, which bound the previous kernel): 0x6400 | u is the float16 1024 + u for u < 1024, so int8
    x is (0x6480 + x) - 1152 and an int4 code c is (0x6400 | c) - 1032; e4m3 bits s.eeee.mmm placed at
    float16's s.eeeee.mmm0000000 are the same value times 2^-8 (normals and subnormals alike), which
    FP8_BITS_FACTOR undoes in the scales. One return statement: Triton's compiler type-checks every return,
    even those under a constexpr branch not taken."""
    if FMT == 0:
        y = x
    elif FAST:
        b = x.to(tl.int32)
        if FMT == 1:
            y = (b + 0x6480).to(tl.int16).to(tl.float16, bitcast=True) - 1152.0
        elif FMT == 2:
            y = (((b & 0x80) << 8) | ((b & 0x7F) << 7)).to(tl.int16).to(tl.float16, bitcast=True)
        else:
            y = (b | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1032.0
    elif FMT == 3:
        y = (x.to(tl.int32) - 8).to(DT)
    else:
        y = x.to(DT)
    return y


@triton.jit
def _attend_block(qv, k_base, v_base, k_scale, v_scale, scale_base, n, end, d, m, l, acc, row_scale,
                  s_kt, s_vt, s_st, D: tl.constexpr, BLOCK_N: tl.constexpr, FMT: tl.constexpr,
                  FAST: tl.constexpr, SCALES: tl.constexpr, K_NATURAL: tl.constexpr, NORM_V: tl.constexpr):
    """One BLOCK_N slice of keys/values folded into the online softmax state (m, l, acc) of all rows.
    qv [BLOCK_H, D] in the dot dtype; n [BLOCK_N] positions; d [D] (int4: [D/2] bytes); m, l [BLOCK_H] fp32
    (base-2 max, sum); acc [BLOCK_H, D] fp32; row_scale [BLOCK_H] fp32 multiplies the raw scores."""
    valid = n < end
    if FMT == 3:  # packed rows are loaded as stored and unpacked to [BLOCK_N, D]
        kb = _unpack_int4(tl.load(k_base + n[:, None] * s_kt + d[None, :], mask=valid[:, None], other=8), BLOCK_N, D)
        scores = tl.dot(qv, tl.trans(_values(kb, FMT, FAST, qv.dtype)))
    elif K_NATURAL:  # the tile as stored (rows of D contiguous values), transposed as a dot operand
        kb = tl.load(k_base + n[:, None] * s_kt + d[None, :], mask=valid[:, None], other=0.0)  # [BLOCK_N, D]
        scores = tl.dot(qv, tl.trans(_values(kb, FMT, FAST, qv.dtype)))
    else:
        kt = tl.load(k_base + n[None, :] * s_kt + d[:, None], mask=valid[None, :], other=0.0)  # [D, BLOCK_N]
        scores = tl.dot(qv, _values(kt, FMT, FAST, qv.dtype))
    scores = scores * row_scale[:, None]
    if SCALES == 1:
        scores = scores * tl.load(k_scale + scale_base + n * s_st, mask=valid, other=0.0).to(tl.float32)[None, :]
    scores = tl.where(valid[None, :], scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    if FMT == 3:
        vb = _unpack_int4(tl.load(v_base + n[:, None] * s_vt + d[None, :], mask=valid[:, None], other=8), BLOCK_N, D)
    else:
        vb = tl.load(v_base + n[:, None] * s_vt + d[None, :], mask=valid[:, None], other=0.0)  # [BLOCK_N, D]
    vb = _values(vb, FMT, FAST, qv.dtype)
    if SCALES == 1:
        vs = tl.load(v_scale + scale_base + n * s_st, mask=valid, other=0.0).to(tl.float32)
        if NORM_V:
            # p * s_v goes through the dot in fp16, which would flush it to subnormals when V is small
            # (s_v ~ 1e-5), so the scales enter relative to their block max, which multiplies back in fp32.
            vs_max = tl.max(vs, 0)
            pv = tl.dot((p * (vs / vs_max)[None, :]).to(qv.dtype), vb) * vs_max
        else:  # bf16 has fp32's exponent range: p * s_v rounds like p alone, with no block max to reduce
            pv = tl.dot((p * vs[None, :]).to(qv.dtype), vb)
    else:
        pv = tl.dot(p.to(qv.dtype), vb)
    return m_new, l, acc * alpha[:, None] + pv


@triton.jit
def _load_query(q, b, s_qb, s_qh, heads, rows, d, qk_scale, G: tl.constexpr, FAST: tl.constexpr):
    """The [BLOCK_H, D] query rows of one kv head in the dot dtype, and the [BLOCK_H] fp32 factor of their
    raw scores. FAST: each row is divided by its max magnitude into float16 (the dot's dtype then; 11
    significant bits, and no overflow for bf16 queries) and the max moves into the factor."""
    qv = tl.load(q + b * s_qb + heads[:, None] * s_qh + d[None, :], mask=rows[:, None] < G, other=0.0)
    if FAST:
        amax = tl.max(tl.abs(qv.to(tl.float32)), 1)
        amax = tl.where(amax > 0.0, amax, 1.0)
        qv = (qv.to(tl.float32) / amax[:, None]).to(tl.float16)
        row_scale = amax * qk_scale
    else:
        row_scale = tl.zeros([rows.shape[0]], tl.float32) + qk_scale
    return qv, row_scale  # one return: see _values


@triton.jit
def _split_kernel(q, k, v, k_scale, v_scale, lengths, part_out, part_lse, qk_scale, num_splits,
                  s_qb, s_qh, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_sb, s_sh, s_st,
                  s_pb, s_ph, s_ps, s_lb, s_lh,
                  G: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                  FMT: tl.constexpr, FAST: tl.constexpr, SCALES: tl.constexpr, K_NATURAL: tl.constexpr,
                  NORM_V: tl.constexpr, VALUE_FACTOR: tl.constexpr):
    """Stage 1, grid (B, Hkv, num_splits): normalized partial output [G, D] and base-2 lse [G] of one
    slice for the G query heads of one kv head. An empty slice stores lse = -inf and zeros.
    VALUE_FACTOR: what _values' K and V tiles must be multiplied by (2^8 for FAST fp8, else 1)."""
    b = tl.program_id(0).to(tl.int64)  # int64: cache offsets pass 2^31 at long context
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    length = tl.load(lengths + b)
    per_split = tl.cdiv(tl.cdiv(length, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, length)

    rows = tl.arange(0, BLOCK_H)
    heads = kvh * G + rows
    d = tl.arange(0, D)
    qv, row_scale = _load_query(q, b, s_qb, s_qh, heads, rows, d, qk_scale * VALUE_FACTOR, G, FAST)
    scale_base = b * s_sb + kvh * s_sh  # static scales come with s_sb = s_st = 0
    if SCALES == 2:
        row_scale = row_scale * tl.load(k_scale + scale_base)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D], tl.float32)
    dk = tl.arange(0, D // 2) if FMT == 3 else d
    for n0 in range(start, end, BLOCK_N):
        m, l, acc = _attend_block(qv, k + b * s_kb + kvh * s_kh, v + b * s_vb + kvh * s_vh, k_scale, v_scale,
                                  scale_base, n0 + tl.arange(0, BLOCK_N), end, dk, m, l, acc, row_scale,
                                  s_kt, s_vt, s_st, D, BLOCK_N, FMT, FAST, SCALES, K_NATURAL, NORM_V)
    acc = acc * VALUE_FACTOR
    if SCALES == 2:
        acc = acc * tl.load(v_scale + scale_base)

    nonempty = l > 0.0
    out = acc / tl.where(nonempty, l, 1.0)[:, None]
    lse = tl.where(nonempty, m + tl.log2(tl.where(nonempty, l, 1.0)), float("-inf"))
    tl.store(part_out + b * s_pb + heads[:, None] * s_ph + split * s_ps + d[None, :], out, mask=rows[:, None] < G)
    tl.store(part_lse + b * s_lb + heads * s_lh + split, lse, mask=rows < G)


@triton.jit
def _merge_kernel(part_out, part_lse, out, num_splits, s_pb, s_ph, s_ps, s_lb, s_lh, s_ob, s_oh,
                  D: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK: tl.constexpr):
    """Stage 2, grid (B, Hq): out = sum_s 2^(lse_s - max) * part_s / sum_s 2^(lse_s - max), the parts read
    CHUNK slices at a time so that registers hold [CHUNK, D], not [num_splits, D]."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    lse = tl.load(part_lse + b * s_lb + h * s_lh + s, mask=s < num_splits, other=float("-inf"))
    top = tl.max(lse, 0)
    total = tl.sum(tl.exp2(lse - top), 0)  # empty slices: 2^-inf = 0
    d = tl.arange(0, D)
    o = tl.zeros([D], tl.float32)
    for s0 in range(0, num_splits, CHUNK):
        c = s0 + tl.arange(0, CHUNK)
        live = c < num_splits
        w = tl.exp2(tl.load(part_lse + b * s_lb + h * s_lh + c, mask=live, other=float("-inf")) - top)
        parts = tl.load(part_out + b * s_pb + h * s_ph + c[:, None] * s_ps + d[None, :], mask=live[:, None], other=0.0)
        o += tl.sum(w[:, None] * parts, 0)
    tl.store(out + b * s_ob + h * s_oh + d, (o / total).to(out.dtype.element_ty))


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
    9). Small batches at long context still keep every SM streaming; no slice is shorter than MIN_SPLIT_TOKENS
    of the cache's capacity."""
    want = 4 * _sm_count(device) // (batch * kv_heads)
    return max(1, min(want, -(-max_len // MIN_SPLIT_TOKENS), DEFAULT_MAX_SPLITS))


def default_config(fmt: str, head_dim: int) -> KernelConfig:
    """DEFAULT_CONFIGS[fmt]; at other head dims block_n is rescaled (within 16..128) so that a K or V
    block keeps its size in bytes, and with it the shared memory and registers it was tuned with."""
    config = DEFAULT_CONFIGS[fmt]
    if head_dim == TUNED_HEAD_DIM:
        return config
    return dataclasses.replace(config, block_n=min(128, max(16, config.block_n * TUNED_HEAD_DIM // head_dim)))


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
    config: stage 1's launch, default default_config(fmt, D); float16 dots (fp16 queries, fast_dequant)
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
    fast = config.fast_dequant and fmt != "dense"
    if fmt == "fp8":  # e4m3 bits as bytes: the fast path reads them as integers
        k, v = (k.view(torch.uint8), v.view(torch.uint8)) if fast else (k, v)
    _split_kernel[(B, hkv, splits)](
        q, k, v, k_scale, v_scale, lengths, part_out, part_lse, sm_scale * math.log2(math.e), splits,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        *scale_strides(mode, k_scale), *part_out.stride()[:3], *part_lse.stride()[:2],
        G=group, BLOCK_H=max(16, triton.next_power_of_2(group)), D=D,
        BLOCK_N=config.block_n, FMT=FMT_CODES[fmt], FAST=fast, SCALES=mode, K_NATURAL=config.k_natural,
        NORM_V=config.norm_v_scale or fast or q.dtype == torch.float16,
        VALUE_FACTOR=FP8_BITS_FACTOR if fast and fmt == "fp8" else 1.0,
        num_warps=config.num_warps, num_stages=config.num_stages)
    _merge_kernel[(B, hq)](
        part_out, part_lse, out, splits, *part_out.stride()[:3], *part_lse.stride()[:2],
        out.stride(0), out.stride(1), D=D, BLOCK_S=max(16, triton.next_power_of_2(splits)),
        CHUNK=MERGE_CHUNK, num_warps=4)
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
