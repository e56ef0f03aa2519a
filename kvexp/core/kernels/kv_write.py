"""Fused quantize-and-store of the new tokens of every sequence: the one token a decode step appends, or
the n tokens of a prefill.

One launch writes K and V of every (sequence, kv head, token): dynamic formats compute the per-(token, head)
scale amax / qmax, round it to the stored bfloat16 and quantize with that stored value, exactly as
kvexp.core.kv.QuantizedKVCache.write does (the reference these kernels are tested bit-exact against).

Rounding is done with exact integer and floor arithmetic instead of Triton's float casts: the result
is then the same under every lowering (PTX cvt.rn, Triton's CPU interpreter, whose casts truncate) and
equals torch's round-half-to-even. Divisions use tl.div_rn, IEEE division as in torch, because Triton's
plain `/` on fp32 lowers to the approximate div.full.f32.
"""
from __future__ import annotations

from typing import Optional

import torch

from kvexp.core.kernels import pdl, require_triton
from kvexp.core.kernels.ptx import wait_for_producer
from kvexp.core.formats import FORMATS

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: keep this module importable, calls fail with how to install
    from kvexp.core.kernels import _MissingTriton as triton, _MissingTriton as tl

KERNEL_FORMATS = ("dense", "int8", "fp8", "int4")  # what write_kv stores and decode_attention reads
MODEL_DTYPES = (torch.float16, torch.bfloat16)
FMT_CODES = {"dense": 0, "int8": 1, "fp8": 2, "int4": 3}  # the kernels' FMT constexpr
# Scale layouts, told apart by ndim: none (dense), dynamic [B, Hkv, Tmax] bf16, static [Hkv] fp32.
NO_SCALE, DYNAMIC, STATIC = 0, 1, 2


@triton.jit
def _round_half_even(y):
    """fp32 -> nearest integer as fp32, ties to even (torch.round). Exact: y - floor(y) is exact in fp32."""
    f = tl.floor(y)
    frac = y - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return f + tl.where((frac > 0.5) | ((frac == 0.5) & odd), 1.0, 0.0)


@triton.jit
def _round_to_bf16(x):
    """Finite fp32 -> the nearest bfloat16 value (ties to even), still held in fp32 (the sign bit is untouched:
    the rounding carries through the magnitude's bits only)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _round_to_e4m3(y):
    """fp32 in [-448, 448] -> the nearest float8_e4m3fn value (ties to even), still held in fp32.

    e4m3 keeps 3 mantissa bits, so its spacing in [2^e, 2^(e+1)) is 2^(e-3); below the smallest normal
    2^-6 it is the subnormal step 2^-9. Dividing |y| by that power of two is exact, so rounding the
    quotient to an integer is the whole job and the final cast to fp8 is exact. The sign is put back as
    a bit because torch keeps it on values that round to zero (-0.0 is 0x80).
    """
    bits = y.to(tl.int32, bitcast=True)
    step_exp = tl.maximum((bits >> 23) & 0xFF, 127 - 6) - 3
    step = (step_exp << 23).to(tl.float32, bitcast=True)
    magnitude = _round_half_even(tl.div_rn(tl.abs(y), step)) * step
    return (magnitude.to(tl.int32, bitcast=True) | ((bits >> 31) << 31)).to(tl.float32, bitcast=True)


@triton.jit
def _store_kv(k, v, k_cache, v_cache, dst, k_scale, v_scale, scale_off, FMT: tl.constexpr, QMAX: tl.constexpr,
              SCALES: tl.constexpr, D: tl.constexpr):
    """Store one token's [D] key and value vectors (model-dtype values in registers) at dst of the caches: as they
    are for a dense cache (SCALES 0), else quantized (_quantize_store)."""
    if SCALES == 0:
        tl.store(k_cache + dst, k)
        tl.store(v_cache + dst, v)
    else:
        _quantize_store(k.to(tl.float32), k_cache, dst, k_scale, scale_off, FMT, QMAX, SCALES, D)
        _quantize_store(v.to(tl.float32), v_cache, dst, v_scale, scale_off, FMT, QMAX, SCALES, D)


@triton.jit
def _quantize_store(x, dst, dst_off, scale_ptr, scale_off, FMT: tl.constexpr, QMAX: tl.constexpr,
                    SCALES: tl.constexpr, D: tl.constexpr):
    """Quantize the [D] float32 vector x (model-dtype values) into dst + dst_off ([D], int4: [D/2] bytes); dynamic:
    also store its scale. FMT: 1 int8, 2 fp8, 3 int4 (codes q + 8 in [0, 15], two per byte, low nibble first)."""
    if SCALES == 1:
        amax = tl.maximum(tl.max(tl.abs(x), 0), 1e-6)
        scale = _round_to_bf16(tl.div_rn(amax, QMAX))
        tl.store(scale_ptr + scale_off, scale.to(tl.bfloat16))  # exact: scale is a bf16 value
    else:
        scale = tl.load(scale_ptr + scale_off)
    y = tl.div_rn(x, tl.zeros_like(x) + scale)
    if FMT == 2:
        y = _round_to_e4m3(tl.minimum(tl.maximum(y, -QMAX), QMAX))
        tl.store(dst + dst_off, y.to(tl.float8e4nv))
    elif FMT == 1:
        y = tl.minimum(tl.maximum(_round_half_even(y), -QMAX), QMAX)
        tl.store(dst + dst_off, y.to(tl.int8))
    else:  # int4 takes -8 too, as kvexp.core.kv.quantize does
        codes = (tl.minimum(tl.maximum(_round_half_even(y), -QMAX - 1.0), QMAX) + 8.0).to(tl.int32)
        lo, hi = tl.split(tl.reshape(codes, [D // 2, 2]))
        tl.store(dst + dst_off, (lo | (hi << 4)).to(tl.uint8))


@triton.jit
def _write_kv_kernel(k_new, v_new, k_cache, v_cache, k_scale, v_scale, pos,
                     s_nb, s_nh, s_nt, s_nd, s_cb, s_ch, s_ct, s_cd, s_sb, s_sh, s_st,
                     D: tl.constexpr, SCALES: tl.constexpr, FMT: tl.constexpr, QMAX: tl.constexpr, PDL: tl.constexpr):
    """Grid (B, Hkv, n): one program stores K and V of one (sequence, kv head) new token i at cache position
    pos[b] + i. k_new/v_new share strides s_n*, k_cache/v_cache share s_c*, dynamic k_scale/v_scale share s_s*."""
    wait_for_producer(PDL)
    b = tl.program_id(0).to(tl.int64)  # int64: cache offsets pass 2^31 at long context
    h = tl.program_id(1).to(tl.int64)
    i = tl.program_id(2).to(tl.int64)
    t = tl.load(pos + b).to(tl.int64) + i
    d = tl.arange(0, D)
    src = b * s_nb + h * s_nh + i * s_nt + d * s_nd
    dst = b * s_cb + h * s_ch + t * s_ct + (tl.arange(0, D // 2) if FMT == 3 else d) * s_cd
    scale_off = b * s_sb + h * s_sh + t * s_st  # static scales come with s_sb = s_st = 0
    _store_kv(tl.load(k_new + src), tl.load(v_new + src), k_cache, v_cache, dst, k_scale, v_scale, scale_off, FMT,
              QMAX, SCALES, D)


@triton.jit
def _to_model_dtype(x, DT: tl.constexpr):
    """float32 -> DT rounded to nearest even under every lowering (the interpreter's bf16 cast truncates)."""
    if DT == tl.bfloat16:
        x = _round_to_bf16(x)
    return x.to(DT)


@triton.jit
def _rope_half(x_ptr, c_ptr, s_ptr, HALF: tl.constexpr):
    """RoPE (rotate-half) of the [2 HALF] vector at x_ptr with cos/sin rows at c_ptr/s_ptr, as the two halves
    (x1 c - x2 s, x2 c + x1 s) in float32, kvexp.core.fused._rotate's math (on a GPU both may contract a
    product into an FMA, so they agree to float32 rounding; in the interpreter, exactly)."""
    h = tl.arange(0, HALF)
    x1, x2 = tl.load(x_ptr + h).to(tl.float32), tl.load(x_ptr + HALF + h).to(tl.float32)
    c1, c2 = tl.load(c_ptr + h), tl.load(c_ptr + HALF + h)
    s1, s2 = tl.load(s_ptr + h), tl.load(s_ptr + HALF + h)
    return x1 * c1 + (-x2) * s1, x2 * c2 + x1 * s2


@triton.jit
def _rope_write_kernel(qkv, cos, sin, q_out, k_cache, v_cache, k_scale, v_scale, pos,
                       s_xb, s_xt, s_rb, s_rt, s_ob, s_oh, s_ot, s_cb, s_ch, s_ct, s_cd, s_sb, s_sh, s_st,
                       HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, SCALES: tl.constexpr,
                       FMT: tl.constexpr, QMAX: tl.constexpr, PDL: tl.constexpr):
    """Grid (B, HQ + HKV, n): program (b, h, i) takes the projections' token i of sequence b ([HQ + 2 HKV] heads of
    D, q then k then v); h < HQ rotates query head h into q_out, h >= HQ rotates key head h - HQ and stores it with
    value head h - HQ into the cache at position pos[b] + i, quantized as _write_kv_kernel does."""
    wait_for_producer(PDL)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    i = tl.program_id(2).to(tl.int64)
    HALF: tl.constexpr = D // 2
    row = qkv + b * s_xb + i * s_xt
    r = b * s_rb + i * s_rt
    half = tl.arange(0, HALF)
    if h < HQ:
        lo, hi = _rope_half(row + h * D, cos + r, sin + r, HALF)
        out = q_out + b * s_ob + h * s_oh + i * s_ot
        tl.store(out + half, _to_model_dtype(lo, q_out.dtype.element_ty))
        tl.store(out + HALF + half, _to_model_dtype(hi, q_out.dtype.element_ty))
    else:
        kvh = h - HQ
        t = tl.load(pos + b).to(tl.int64) + i
        lo, hi = _rope_half(row + (HQ + kvh) * D, cos + r, sin + r, HALF)
        # the rotated key is rounded to the model dtype first, as the torch path stores it / quantizes it
        k = tl.join(_to_model_dtype(lo, qkv.dtype.element_ty), _to_model_dtype(hi, qkv.dtype.element_ty))  # [HALF, 2]
        k = tl.reshape(tl.permute(k, (1, 0)), [D])  # lo then hi
        v = tl.load(row + (HQ + HKV + kvh) * D + tl.arange(0, D))
        dst = b * s_cb + kvh * s_ch + t * s_ct + (tl.arange(0, D // 2) if FMT == 3 else tl.arange(0, D)) * s_cd
        _store_kv(k, v, k_cache, v_cache, dst, k_scale, v_scale, b * s_sb + kvh * s_sh + t * s_st, FMT, QMAX, SCALES,
                  D)


def scale_mode(fmt: str, k_scale: Optional[torch.Tensor], v_scale: Optional[torch.Tensor], hkv: int) -> int:
    """Validate the scale tensors of `fmt` and return NO_SCALE, DYNAMIC or STATIC."""
    if fmt not in KERNEL_FORMATS:
        raise ValueError(f"fmt must be one of {KERNEL_FORMATS}, got {fmt!r}")
    if fmt == "dense":
        if k_scale is not None or v_scale is not None:
            raise ValueError("fmt 'dense' takes no scales: pass k_scale=v_scale=None")
        return NO_SCALE
    if k_scale is None or v_scale is None or k_scale.ndim not in (1, 3) or k_scale.stride() != v_scale.stride():
        raise ValueError("k_scale/v_scale must both be dynamic [B, Hkv, Tmax] bfloat16 or static [Hkv] float32, "
                         "of one layout")
    if k_scale.ndim == 1:
        if k_scale.dtype != torch.float32 or v_scale.dtype != torch.float32 or k_scale.shape != (hkv,):
            raise ValueError(f"static scales must be [Hkv]=[{hkv}] float32, got {tuple(k_scale.shape)} {k_scale.dtype}")
        return STATIC
    if k_scale.dtype != torch.bfloat16 or v_scale.dtype != torch.bfloat16:
        raise ValueError(f"dynamic scales must be bfloat16 [B, Hkv, Tmax], got {k_scale.dtype}")
    return DYNAMIC


def scale_strides(mode: int, k_scale: Optional[torch.Tensor]) -> tuple[int, int, int]:
    """(b, h, t) element strides of the scales; static [Hkv] scales broadcast over b and t."""
    if mode == DYNAMIC:
        return k_scale.stride()
    return (0, k_scale.stride(0), 0) if mode == STATIC else (0, 0, 0)


def _check_caches(k_cache: torch.Tensor, v_cache: torch.Tensor, fmt: str, dtype: torch.dtype, B: int, hkv: int,
                  D: int, pos: torch.Tensor) -> None:
    """One layer's caches for n new tokens of B sequences, Hkv heads of D (a power of two, >= 4) in `dtype`: the
    format's storage dtype, one layout for K and V, [B, Hkv, Tmax, D] (int4: D/2), and pos [B]."""
    storage = dtype if fmt == "dense" else FORMATS[fmt].storage
    if k_cache.dtype != storage or v_cache.dtype != storage or k_cache.stride() != v_cache.stride():
        raise ValueError(f"fmt {fmt!r} with {dtype} inputs needs {storage} caches of one layout")
    width = D // 2 if fmt == "int4" else D
    if tuple(k_cache.shape[:2]) != (B, hkv) or k_cache.shape[3] != width or D & (D - 1) or D < 4 or pos.shape != (B,):
        raise ValueError(f"shapes: k_cache {tuple(k_cache.shape)}, pos {tuple(pos.shape)} must be [B, Hkv, Tmax, D] "
                         f"(int4: D/2; D a power of two) = {(B, hkv, 'Tmax', width)}, [B] = {(B,)}")


def write_kv(k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             k_scale: Optional[torch.Tensor], v_scale: Optional[torch.Tensor], pos: torch.Tensor, fmt: str) -> None:
    """Quantize and store n new tokens per sequence, in place, in one launch (CUDA-graph capturable).

    k_new, v_new: [B, Hkv, D] (one token) or [B, Hkv, n, D], float16/bfloat16 (the model dtype; dense
        caches must have the same dtype); token i goes to position pos[b] + i.
    k_cache, v_cache: [B, Hkv, Tmax, D] of one layer: the model dtype ("dense"), int8 or float8_e4m3fn;
        int4: [B, Hkv, Tmax, D/2] uint8 (kvexp.core.kv's packing).
    k_scale, v_scale: None ("dense"), dynamic [B, Hkv, Tmax] bfloat16 (written here at pos), or static
        [Hkv] float32 (read only). pos: [B] int32/int64 device tensor, the first cache position to write.
    Same values as kvexp.core.kv.KVCache._write / QuantizedKVCache._write (the torch path).
    """
    mode = scale_mode(fmt, k_scale, v_scale, k_cache.shape[1])
    if k_new.ndim == 3:
        k_new, v_new = k_new[:, :, None], v_new[:, :, None]
    B, hkv, n, D = k_new.shape
    if k_new.dtype not in MODEL_DTYPES or k_new.shape != v_new.shape or k_new.stride() != v_new.stride():
        raise ValueError(f"k_new/v_new must be [B, Hkv, (n,) D] float16/bfloat16 of one layout, got {k_new.dtype}")
    _check_caches(k_cache, v_cache, fmt, k_new.dtype, B, hkv, D, pos)
    require_triton(triton, k_new, _write_kv_kernel)
    on = pdl(k_new)
    _write_kv_kernel[(B, hkv, n)](
        k_new, v_new, k_cache, v_cache, k_scale, v_scale, pos,
        *k_new.stride(), *k_cache.stride(), *scale_strides(mode, k_scale),
        D=D, SCALES=mode, FMT=FMT_CODES[fmt], QMAX=FORMATS[fmt].qmax if mode else 0.0, PDL=on,
        num_warps=1 if D <= 128 else 2, launch_pdl=on)


def rope_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, k_cache: torch.Tensor,
               v_cache: torch.Tensor, k_scale: Optional[torch.Tensor], v_scale: Optional[torch.Tensor],
               pos: torch.Tensor, fmt: str) -> torch.Tensor:
    """RoPE and the cache write of n new tokens per sequence in one launch, straight from the q|k|v projection:
    what kvexp.core.fused.split_heads followed by write_kv computes (values equal up to float32 rounding
    of the rotation), with one kernel instead of three to five per layer of a decode step.

    qkv: [B, n, (heads + 2 Hkv) D] float16/bfloat16, rows contiguous; cos, sin: [B, 1, n, D] float32 (rotate-half
    tables); caches, scales, pos and fmt as write_kv's. Returns the rotated queries [B, heads, n, D].
    """
    B, n, width = qkv.shape
    hkv = k_cache.shape[1]
    D = width // (heads + 2 * hkv)
    mode = scale_mode(fmt, k_scale, v_scale, hkv)
    if qkv.dtype not in MODEL_DTYPES or qkv.stride(2) != 1 or D * (heads + 2 * hkv) != width:
        raise ValueError(f"qkv must be [B, n, (heads + 2 Hkv) D] float16/bfloat16 with contiguous rows, got "
                         f"{tuple(qkv.shape)} {qkv.dtype}")
    if cos.shape != (B, 1, n, D) or sin.shape != cos.shape or cos.dtype != torch.float32 or \
            cos.stride() != sin.stride() or cos.stride(3) != 1:
        raise ValueError(f"cos/sin must be [B, 1, n, D] = {(B, 1, n, D)} float32 of one layout, got {tuple(cos.shape)}")
    _check_caches(k_cache, v_cache, fmt, qkv.dtype, B, hkv, D, pos)
    require_triton(triton, qkv, _rope_write_kernel)
    q = torch.empty(B, heads, n, D, dtype=qkv.dtype, device=qkv.device)
    on = pdl(qkv)
    _rope_write_kernel[(B, heads + hkv, n)](
        qkv, cos, sin, q, k_cache, v_cache, k_scale, v_scale, pos,
        qkv.stride(0), qkv.stride(1), cos.stride(0), cos.stride(2), *q.stride()[:3], *k_cache.stride(),
        *scale_strides(mode, k_scale), HQ=heads, HKV=hkv, D=D, SCALES=mode, FMT=FMT_CODES[fmt],
        QMAX=FORMATS[fmt].qmax if mode else 0.0, PDL=on, num_warps=1 if D <= 128 else 2, launch_pdl=on)
    return q
