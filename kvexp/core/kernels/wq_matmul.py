"""Weight-only quantized matmul (W4A16 / W8A16) for the decode step, and the dequantize kernel for prefill.

Formats (kvexp.core.int4's, engine-neutral), per output row n and group g of `group` input columns:
  bits 4: qweight [N, K/2] uint8, q + 8 in a nibble, column 2i low, 2i+1 high; q in [-8, 7]
  bits 8: qweight [N, K] int8, q in [-127, 127]
  w[n, k] = q[n, k] * scales[n, k // group]  (scales [N, K/group] in the model dtype)

`wq_matmul` computes y [M, N] = (x * pre_scale) @ w^T + bias for a few rows (M <= 16: the decode batch).
At batch 1 a ~1B model's step must stream every weight byte once at the memory bandwidth, so the kernel
keeps the weights packed all the way into registers: each program owns BLOCK_N output columns and a slice of
K (split-K, so that even the 2048-wide projections give a few programs per SM), dots one group at a time
with the integer weights (exact in bf16/fp16) and applies the group's scale to the [M, BLOCK_N] partial.
Split-K programs write fp32 partials; the last one to finish a column tile (a counter per tile, reset by
that program) sums them and writes the output, so one launch does the whole layer: no memset, no second
reduction kernel (the stream-K fix-up of Osama et al., 2023). On CUDA int4 codes become model-dtype values by PTX
bit tricks (lop3 under a float's exponent, then one fused subtract per two values), not by per-value I2F casts.

FP8 (kvexp.core.fp8's format): qweight [N, K] float8_e4m3fn with one float32 scale per output row, applied
once to the finished sum (row_scale=True), not per group. With activations in e4m3 too (x_quant), x arrives in
the model dtype and the kernel rounds it to e4m3 itself, as `quantize_rows_ref` does: each program first finds
its rows' amax (dynamic; a static scale is loaded), then every x tile is multiplied by 448 / amax and rounded
just before its dot. A separate quantize_rows launch per linear cost more than the halved weight read saved at a
1B model's sizes (H100, 2026-12-02: W8A8 decoded at 0.79x bf16). The product is taken transposed, y^T = w @ x^T,
so the weight tile is the MMA's 64-row side and on Hopper Triton issues an fp8 wgmma on the e4m3 operands as
they were loaded: no weight is converted (the weight-only path's e4m3 -> bf16 conversions bound it by its ALU,
at ~2.1 TB/s on the H200). The finish multiplies by x's row scale as well. sm89+ (e4m3 casts).

`dequantize` writes the dense weight [N, K] in the model dtype, one pass at ~2.5 bytes per weight, for
prefill, where a dense GEMM on many rows beats any GEMV. The *_ref functions are the same math in
PyTorch, the CPU path and what the tests hold the kernels to.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from kvexp.core.kernels import pdl, require_triton
from kvexp.core.kernels.ptx import int4_halves_bf16, int4_halves_f16, wait_for_producer

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: keep this module importable, calls fail with how to install
    from kvexp.core.kernels import _MissingTriton as triton, _MissingTriton as tl

GEMV_ROWS = 16  # the kernel pads the rows to one 16-row tensor-core tile; more rows run dequantize + GEMM
BITS_QMAX = {4: 7, 8: 127}  # symmetric integer grid per width
E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # the largest finite e4m3fn magnitude
AMAX_FLOOR = 1e-12  # an all-zero row (padding) gets a tiny scale, so it quantizes to zeros, not NaN
_QMAX, _AMAX_MIN = tl.constexpr(E4M3_MAX), tl.constexpr(AMAX_FLOOR)  # the same, inside the kernels


def unpack_ref(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Stored qweight -> integer q [N, K] int8."""
    if bits == 8:
        return qweight.view(torch.int8)
    lo, hi = (qweight & 0xF).to(torch.int8) - 8, (qweight >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), -1).flatten(-2)


def dequantize_ref(qweight: torch.Tensor, scales: torch.Tensor, group: int, bits: int,
                   dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Dense w [N, K] = q * scale, computed in float32 and rounded once to dtype (default float32)."""
    q = unpack_ref(qweight, bits).float()
    N, K = q.shape
    w = (q.reshape(N, K // group, group) * scales.float()[..., None]).reshape(N, K)
    return w if dtype is None else w.to(dtype)


def wq_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group: int, bits: int,
                  pre_scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [M, K] -> (x * pre_scale) @ w^T + bias [M, N] in x's dtype, through the dense weight."""
    if pre_scale is not None:
        x = x * pre_scale
    return torch.nn.functional.linear(x, dequantize_ref(qweight, scales, group, bits, x.dtype), bias)


def quantize_rows_ref(x: torch.Tensor, scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scales [M]) with x ~ q * scale: one scale per row, amax / 448 (dynamic),
    or the given calibrated per-tensor scale (static, a 0-d float32 tensor; values beyond it saturate). q is x
    times the row's reciprocal scale (448 / amax, or 1 / scale), rounded to nearest even: one IEEE division per
    row and a multiply per value, which the GPU kernels (`quantize_rows`, wq_matmul's x_quant) repeat bit for bit
    at a fraction of a division's cost per value."""
    xf = x.float()
    if scale is None:  # tensor divisions: torch turns division by a Python scalar into a reciprocal multiply
        amax = xf.abs().amax(-1).clamp_min(AMAX_FLOOR)
        qmax = torch.full_like(amax, E4M3_MAX)
        scale, inv = amax / qmax, qmax / amax
    else:
        scale = scale.float().expand(x.shape[0])
        inv = torch.ones_like(scale) / scale
    return (xf * inv[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


@dataclass(frozen=True)
class MatmulConfig:
    block_n: int = 32
    split_k: int = 0  # 0: enough splits for ~`waves` programs per SM
    num_warps: int = 4
    num_stages: int = 4
    waves: int = 4
    int4_asm: bool = True  # int4 on CUDA: nibbles to the model dtype by PTX (False: Triton's casts, as the
    # interpreter, which runs no PTX, always does)


DEFAULT_CONFIG = MatmulConfig(block_n=32, waves=2)
HEAD_CONFIG = MatmulConfig(block_n=64, waves=4)  # vocab-sized outputs: already thousands of programs
# int4 at block_n 32 moved 2 KB of weights per loop step against bf16's 8 KB, with the same x loads, dot and scale
# loads per step, and ran no faster than bf16 on the H200 (2026-12-03, bench_linears: 17.8 vs 16.7 us for Qwen's
# gate|up at batch 1, with PTX or cast unpacking alike): 128 columns give it bf16's bytes per step
INT4_CONFIG = MatmulConfig(block_n=128, waves=2)
# W8A8 takes the weight rows as a wgmma's 64-row side: at least 64 of them per program (fewer fall back to an fp16
# MMA). 64 rows at 2 waves beat 128 rows, 4 waves and 3 stages on every projection of both model shapes at batch 1
# and 8 (H200, 2026-12-03: Llama's q|k|v 7.6 / 8.7 us against 8.1 / 11.0 at 128 rows, gate|up 13.4 / 14.9 against
# 17.6 / 20.0)
W8A8_CONFIG = MatmulConfig(block_n=64, waves=2)
# (weight rows, K, bits, row bucket) -> the measured best config (scripts/bench_decode.py --tune fills it in)
CONFIGS: dict[tuple[int, int, int, int], MatmulConfig] = {}


def row_bucket(m: int) -> int:
    return 1 if m == 1 else 8 if m <= 8 else GEMV_ROWS


def config_for(m: int, rows: int, k: int, bits: int, w8a8: bool = False) -> MatmulConfig:
    """A tuned entry, else the defaults that won the H200 sweep (2026-12-02, bench_linears.py: (32, 2) on every
    projection of Llama-3.2-1B and Qwen2.5-1.5B in bf16, (64, 4) on their heads in bf16 and int8)."""
    if w8a8:
        return W8A8_CONFIG
    default = INT4_CONFIG if bits == 4 else HEAD_CONFIG if rows >= 32768 else DEFAULT_CONFIG
    return CONFIGS.get((rows, k, bits, row_bucket(m)), default)


def dense_tile(k: int) -> int:
    """The K tile of the dense (bits 16) kernel: the largest of 128, 64, 32 dividing K."""
    return next((t for t in (128, 64, 32) if k % t == 0), 0)


def split_for(cfg: MatmulConfig, n_tiles: int, n_groups: int, sms: int) -> int:
    """Splits of K: enough programs to keep ~cfg.waves per SM in flight, at least one group each."""
    if cfg.split_k:
        return max(1, min(cfg.split_k, n_groups))
    return max(1, min(n_groups, (cfg.waves * sms) // max(n_tiles, 1)))


@triton.jit
def _e4m3(v):
    """float32 values already multiplied by their reciprocal scale -> e4m3, saturated (quantize_rows_ref)."""
    return tl.minimum(tl.maximum(v, -_QMAX), _QMAX).to(tl.float8e4nv)


@triton.jit
def _row_scales(x_ptr, xs_ptr, m0, M, K, stride_xm, BLOCK_M: tl.constexpr, X_QUANT: tl.constexpr,
                AMAX_M: tl.constexpr, AMAX_K: tl.constexpr):
    """(scale, 1 / scale) [BLOCK_M] float32 of x's rows m0.. for X_QUANT (1: amax / 448 over the row, 2: the
    calibrated scalar at xs_ptr), each an IEEE division as quantize_rows_ref's; zeros without X_QUANT. Every
    program of a launch reads the whole rows for their amax (at decode M*K*2 bytes of L2 hits, against its own
    K*BLOCK_N weight bytes from DRAM), AMAX_M rows at a time: the rows that exist, not the tile's 16."""
    scale = tl.zeros((BLOCK_M,), dtype=tl.float32)
    inv = scale
    if X_QUANT == 1:
        rows = m0 + tl.arange(0, AMAX_M)  # 64-bit where m0 is (quantize_rows: prefill's x passes 2^31 elements)
        peak = tl.zeros((AMAX_M,), dtype=tl.float32)
        for k0 in range(0, K, AMAX_K):
            k = k0 + tl.arange(0, AMAX_K)
            xv = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :],
                         mask=(rows < M)[:, None] & (k < K)[None, :], other=0.0)
            peak = tl.maximum(peak, tl.max(tl.abs(xv.to(tl.float32)), 1))
        # row i of the tile takes peak[i]; rows past AMAX_M are past M, so floor-scaled zeros
        amax = tl.sum(tl.where(tl.arange(0, BLOCK_M)[:, None] == tl.arange(0, AMAX_M)[None, :], peak[None, :], 0.0), 1)
        amax = tl.maximum(amax, _AMAX_MIN)
        qmax = tl.full((BLOCK_M,), _QMAX, tl.float32)
        scale, inv = tl.math.div_rn(amax, qmax), tl.math.div_rn(qmax, amax)
    elif X_QUANT == 2:
        scale = tl.load(xs_ptr + tl.zeros((BLOCK_M,), dtype=tl.int32))
        inv = tl.math.div_rn(tl.full((BLOCK_M,), 1.0, tl.float32), scale)
    return scale, inv


@triton.jit
def _group_dot(x_ptr, w_ptr, pre_ptr, offs_m, offs_n, mask_m, mask_n, g, stride_xm, stride_wn,
               GROUP: tl.constexpr, BITS: tl.constexpr, HAS_PRE: tl.constexpr, ASM: tl.constexpr):
    """[BLOCK_M, BLOCK_N] fp32 = x[:, group g] @ q[rows offs_n, group g]^T (integer weights, no scale yet)."""
    dtype = x_ptr.dtype.element_ty
    if BITS == 4:
        # one 16-byte-vectorised load of the packed bytes and one of x (loading x at stride 2 for the even and
        # odd columns cost a scalar load per element: 3-4x slower than int8 on the H200, 2026-12-02)
        j = tl.arange(0, GROUP // 2)
        wb = tl.load(w_ptr + offs_n[:, None] * stride_wn + (g * (GROUP // 2) + j)[None, :],
                     mask=mask_n[:, None], other=0)
        k = g * GROUP + tl.arange(0, GROUP)
        xa = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=mask_m[:, None], other=0.0)
        if HAS_PRE:  # rounded to the model dtype before the dot, as (x * pre_scale) is in PyTorch
            xa = (xa.to(tl.float32) * tl.load(pre_ptr + k).to(tl.float32)[None, :]).to(dtype)
        if ASM:
            # The nibbles become model-dtype code - 8 by PTX bit tricks, 8 values in ~12 instructions (the
            # attention kernel's int4 path), where Triton's casts issue one I2F per value and bound the kernel by
            # its ALU, not its bytes; the even and odd columns are two dots, with x split to match in registers.
            if dtype == tl.bfloat16:
                we, wo = int4_halves_bf16(wb)
            else:
                we, wo = int4_halves_f16(wb)
            xe, xo = tl.split(tl.reshape(xa, (xa.shape[0], GROUP // 2, 2)))
            return tl.dot(xe, tl.trans(we)) + tl.dot(xo, tl.trans(wo))
        # nibbles interleaved back in registers (join puts the pair in one thread)
        wb = wb.to(tl.int32)
        w = tl.reshape(tl.join(((wb & 15) - 8).to(dtype), ((wb >> 4) - 8).to(dtype)), (wb.shape[0], GROUP))
        return tl.dot(xa, tl.trans(w))
    else:  # int8 codes, e4m3 weights, or (BITS 16) the dense weight itself, one K tile of GROUP columns
        k = g * GROUP + tl.arange(0, GROUP)
        # other=0.0: an integer fill would need an int -> fp8 cast for e4m3 weights
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + k[None, :], mask=mask_n[:, None], other=0.0).to(dtype)
        xa = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=mask_m[:, None], other=0.0)
        if HAS_PRE:
            xa = (xa.to(tl.float32) * tl.load(pre_ptr + k).to(tl.float32)[None, :]).to(dtype)
        return tl.dot(xa, tl.trans(w))


@triton.jit
def _w8a8_loop(x_ptr, w_ptr, x_inv, offs_m, offs_n, mask_m, mask_n, N, g_start, g_end, stride_xm, stride_wn,
               GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GATED: tl.constexpr):
    """The W8A8 K loop: each x tile rounded to e4m3 once (shared by gate and up) and the product taken as
    y^T = w @ x^T, the weight rows on the MMA's M side, so that on Hopper it is an fp8 wgmma on the operands
    as loaded (no conversion of the weights; 16 rows of x fit its N = 16). Returns the [BLOCK_M, BLOCK_N] sums."""
    acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    up_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for g in range(g_start, g_end):
        k = g * GROUP + tl.arange(0, GROUP)
        xa = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=mask_m[:, None], other=0.0)
        xq_t = tl.trans(_e4m3(xa.to(tl.float32) * x_inv[:, None]))
        # each K tile's products summed apart, then added in float32 on the CUDA cores: Hopper's fp8 MMA keeps
        # ~14 bits of its running sum (DeepSeek-V3's report, which promotes every 128 columns the same way)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + k[None, :], mask=mask_n[:, None], other=0.0)
        acc_t += tl.dot(w, xq_t)
        if GATED:
            wu = tl.load(w_ptr + (offs_n + N)[:, None] * stride_wn + k[None, :], mask=mask_n[:, None], other=0.0)
            up_t += tl.dot(wu, xq_t)
    return tl.trans(acc_t), tl.trans(up_t)


@triton.jit
def _accumulate(acc, x_ptr, w_ptr, s_ptr, pre_ptr, offs_m, offs_n, mask_m, mask_n, g, stride_xm, stride_wn,
                stride_sn, GROUP: tl.constexpr, BITS: tl.constexpr, HAS_PRE: tl.constexpr, ROW_SCALE: tl.constexpr,
                ASM: tl.constexpr):
    part = _group_dot(x_ptr, w_ptr, pre_ptr, offs_m, offs_n, mask_m, mask_n, g, stride_xm, stride_wn,
                      GROUP, BITS, HAS_PRE, ASM)
    if BITS == 16 or ROW_SCALE:  # no group scales (ROW_SCALE: applied once, in _finish)
        return acc + part
    s = tl.load(s_ptr + offs_n * stride_sn + g, mask=mask_n, other=0.0).to(tl.float32)
    return acc + part * s[None, :]


@triton.jit
def _wq_matmul_kernel(x_ptr, w_ptr, s_ptr, xs_ptr, pre_ptr, bias_ptr, part_ptr, lock_ptr, out_ptr,
                      M, N, n_groups, stride_xm, stride_wn, stride_sn, stride_om,
                      SPLIT_K, GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, HAS_PRE: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
                      ROW_SCALE: tl.constexpr, X_QUANT: tl.constexpr, AMAX_M: tl.constexpr, AMAX_K: tl.constexpr,
                      ASM: tl.constexpr, PDL: tl.constexpr):
    """GATED: the weight is [gate; up] (2N rows) and the output silu(gate) * up [M, N], the MLP's epilogue.
    ROW_SCALE: one weight scale per row (s_ptr [rows]). X_QUANT: x is rounded to e4m3 per row in the kernel,
    1 with its amax scale (dynamic), 2 with the calibrated one at xs_ptr (static). PDL: launched with programmatic
    dependent launch (kernels.pdl)."""
    wait_for_producer(PDL)
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    x_scale, x_inv = _row_scales(x_ptr, xs_ptr, pid_m * BLOCK_M, M, n_groups * GROUP, stride_xm, BLOCK_M, X_QUANT,
                                 AMAX_M, AMAX_K)
    per_split = tl.cdiv(n_groups, SPLIT_K)
    g_end = tl.minimum(n_groups, (pid_k + 1) * per_split)
    if X_QUANT:
        acc, acc_up = _w8a8_loop(x_ptr, w_ptr, x_inv, offs_m, offs_n, mask_m, mask_n, N, pid_k * per_split, g_end,
                                 stride_xm, stride_wn, GROUP, BLOCK_M, BLOCK_N, GATED)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(pid_k * per_split, g_end):
            acc = _accumulate(acc, x_ptr, w_ptr, s_ptr, pre_ptr, offs_m, offs_n, mask_m, mask_n, g, stride_xm,
                              stride_wn, stride_sn, GROUP, BITS, HAS_PRE, ROW_SCALE, ASM)
            if GATED:
                acc_up = _accumulate(acc_up, x_ptr, w_ptr, s_ptr, pre_ptr, offs_m, offs_n + N, mask_m, mask_n, g,
                                     stride_xm, stride_wn, stride_sn, GROUP, BITS, HAS_PRE, ROW_SCALE, ASM)
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        _finish(acc, acc_up, s_ptr, x_scale, bias_ptr, out_ptr, offs_m, offs_n, N, mask, mask_n, stride_om,
                HAS_BIAS, GATED, ROW_SCALE, X_QUANT)
    else:
        tile = pid_m * tl.num_programs(0) + pid_n
        width = 2 * N if GATED else N  # partials [SPLIT_K, M, width] fp32
        part_offs = offs_m[:, None] * width + offs_n[None, :]
        tl.store(part_ptr + pid_k * M * width + part_offs, acc, mask=mask)
        if GATED:
            tl.store(part_ptr + pid_k * M * width + part_offs + N, acc_up, mask=mask)
        tl.debug_barrier()  # every thread's partial is stored before the counter says so (release below)
        if tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel") == SPLIT_K - 1:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(SPLIT_K):  # .cg: the other programs' partials are in L2, never in this SM's L1
                acc += tl.load(part_ptr + k * M * width + part_offs, mask=mask, other=0.0, cache_modifier=".cg")
                if GATED:
                    acc_up += tl.load(part_ptr + k * M * width + part_offs + N, mask=mask, other=0.0,
                                      cache_modifier=".cg")
            tl.atomic_xchg(lock_ptr + tile, 0)  # ready for the next launch (and the next graph replay)
            _finish(acc, acc_up, s_ptr, x_scale, bias_ptr, out_ptr, offs_m, offs_n, N, mask, mask_n, stride_om,
                    HAS_BIAS, GATED, ROW_SCALE, X_QUANT)


@triton.jit
def _finish(acc, acc_up, s_ptr, x_scale, bias_ptr, out_ptr, offs_m, offs_n, N, mask, mask_n, stride_om,
            HAS_BIAS: tl.constexpr, GATED: tl.constexpr, ROW_SCALE: tl.constexpr, X_QUANT: tl.constexpr):
    if ROW_SCALE:  # (x . q) * x_scale * w_scale, in this order, as kvexp.core.fp8's reference
        if X_QUANT:
            acc = acc * x_scale[:, None]
            acc_up = acc_up * x_scale[:, None]
        acc = acc * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        if GATED:
            acc_up = acc_up * tl.load(s_ptr + N + offs_n, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(bias_ptr + N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_up
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


_LOCKS: dict[torch.device, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # outgrown counter buffers: CUDA graphs captured with them still point there


def _locks(device: torch.device, n: int) -> torch.Tensor:
    """Per-device split-K counters, all zero between launches (each kernel resets the ones it used).
    Layers run one after another on one stream, so they share them."""
    buf = _LOCKS.get(device)
    if buf is None or buf.numel() < n:
        if buf is not None:
            _RETIRED.append(buf)
        buf = _LOCKS[device] = torch.zeros(max(n, 1 << 14), dtype=torch.int32, device=device)
    return buf


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def wq_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: Optional[torch.Tensor], group: int, bits: int,
              pre_scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, gated: bool = False,
              config: Optional[MatmulConfig] = None, out: Optional[torch.Tensor] = None, row_scale: bool = False,
              x_quant: Optional[str] = None, x_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [M, K] fp16/bf16 (M <= GEMV_ROWS for speed; any M is correct) -> [M, N] in x's dtype (into out).
    bits 16: qweight is the dense weight [N, K] (scales None; group = the K tile). gated: qweight holds
    [gate; up] (2N rows) and the result is silu(gate) * up [M, N]. row_scale: scales [rows] float32, one per
    weight row (fp8 weights; group is then only the K tile). x_quant (e4m3 weights): x is rounded to e4m3 in the
    kernel as quantize_rows_ref(x, x_scale) does, "dynamic" (per row, amax / 448) or "static" (x_scale, 0-d)."""
    if x_quant not in (None, "dynamic", "static") or (x_quant == "static") != (x_scale is not None) \
            or (x_quant is not None and not (bits == 8 and row_scale)):
        raise ValueError(f"wq_matmul: x_quant={x_quant!r}: 'dynamic', or 'static' with x_scale, over e4m3 weights "
                         "with row scales (bits=8, row_scale=True)")
    require_triton(triton, x, _wq_matmul_kernel)
    x = x.contiguous()
    M, K = x.shape
    rows = qweight.shape[0]
    N = rows // 2 if gated else rows
    if K % group or group % 32 or qweight.shape[1] != (K // 2 if bits == 4 else K):
        raise ValueError(f"wq_matmul: K={K}, group={group}, qweight {tuple(qweight.shape)} do not match {bits}-bit "
                         "weights in groups of a multiple of 32 columns")
    n_groups, block_m = K // group, 16
    amax_m = min(block_m, triton.next_power_of_2(M))  # the rows _row_scales reads for x_quant's amax
    config = config or config_for(M, N * (2 if gated else 1), K, bits, x_quant is not None)
    n_tiles, m_tiles = triton.cdiv(N, config.block_n), triton.cdiv(M, block_m)
    split = split_for(config, n_tiles * m_tiles, n_groups, _sms(x.device))
    out = torch.empty(M, N, dtype=x.dtype, device=x.device) if out is None else out
    part = torch.empty(split if split > 1 else 1, M, rows, dtype=torch.float32, device=x.device)
    locks = _locks(x.device, n_tiles * m_tiles)
    on = pdl(x)
    _wq_matmul_kernel[(n_tiles, split, m_tiles)](
        x, qweight, qweight if scales is None else scales, x if x_scale is None else x_scale.float(),
        x if pre_scale is None else pre_scale, x if bias is None else bias, part, locks, out,
        M, N, n_groups, x.stride(0), qweight.stride(0), 0 if scales is None or row_scale else scales.stride(0),
        out.stride(0), split, GROUP=group, BITS=bits, BLOCK_M=block_m, BLOCK_N=config.block_n,
        HAS_PRE=pre_scale is not None, HAS_BIAS=bias is not None, GATED=gated, ROW_SCALE=row_scale,
        X_QUANT={None: 0, "dynamic": 1, "static": 2}[x_quant], AMAX_M=amax_m, AMAX_K=_amax_tile(amax_m, K),
        ASM=bits == 4 and config.int4_asm and x.is_cuda, PDL=on,
        num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=on)
    return out


def _amax_tile(rows: int, k: int) -> int:
    """Columns per load of _row_scales' amax pass: 8192 values a load (64 a thread at 4 warps), whole rows where
    they fit."""
    return min(8192 // rows, triton.next_power_of_2(k))


@triton.jit
def _quantize_rows_kernel(x_ptr, scale_ptr, q_ptr, s_out_ptr, K, stride_xm, stride_qm, X_QUANT: tl.constexpr,
                          AMAX_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per row: the GEMV's row scale and rounding (_row_scales, _e4m3), written out for
    torch._scaled_mm."""
    m0 = tl.program_id(0).to(tl.int64)  # row * stride passes 2^31 at 8 x 32k prefill rows of the Qwen2.5-1.5B shape
    row = m0 + tl.arange(0, 1)
    scale, inv = _row_scales(x_ptr, scale_ptr, m0, m0 + 1, K, stride_xm, 1, X_QUANT, 1, AMAX_K)
    tl.store(s_out_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_ptr + row * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        tl.store(q_ptr + row * stride_qm + k, _e4m3(xv * inv), mask=k < K)


def quantize_rows(x: torch.Tensor, scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows_ref in one launch: x [M, K] -> (e4m3 [M, K], float32 scales [M]), bit-identical."""
    require_triton(triton, x, _quantize_rows_kernel)
    x = x.contiguous()
    M, K = x.shape
    q = torch.empty(M, K, dtype=E4M3, device=x.device)
    s = torch.empty(M, dtype=torch.float32, device=x.device)
    _quantize_rows_kernel[(M,)](x, s if scale is None else scale.float(), q, s, K, x.stride(0), q.stride(0),
                                X_QUANT=1 if scale is None else 2, AMAX_K=_amax_tile(1, K),
                                BLOCK_K=min(4096, triton.next_power_of_2(K)))
    return q, s


@triton.jit
def _dequantize_kernel(w_ptr, s_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_on,
                       GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    dtype = out_ptr.dtype.element_ty
    if BITS == 4:
        j = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        mask = mask_n[:, None] & (j < K // 2)[None, :]
        wb = tl.load(w_ptr + offs_n[:, None] * stride_wn + j[None, :], mask=mask, other=0).to(tl.int32)
        s = tl.load(s_ptr + offs_n[:, None] * stride_sn + (2 * j // GROUP)[None, :], mask=mask, other=0.0)
        s = s.to(tl.float32)
        row = out_ptr + offs_n[:, None] * stride_on
        tl.store(row + (2 * j)[None, :], (((wb & 15) - 8).to(tl.float32) * s).to(dtype), mask=mask)
        tl.store(row + (2 * j + 1)[None, :], (((wb >> 4) - 8).to(tl.float32) * s).to(dtype), mask=mask)
    else:
        k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = mask_n[:, None] & (k < K)[None, :]
        q = tl.load(w_ptr + offs_n[:, None] * stride_wn + k[None, :], mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + offs_n[:, None] * stride_sn + (k // GROUP)[None, :], mask=mask, other=0.0)
        tl.store(out_ptr + offs_n[:, None] * stride_on + k[None, :], (q * s.to(tl.float32)).to(dtype), mask=mask)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, group: int, bits: int, dtype: torch.dtype,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The dense weight [N, K] in dtype (into out), bit-identical to dequantize_ref(..., dtype)."""
    require_triton(triton, qweight, _dequantize_kernel)
    N, K = qweight.shape[0], qweight.shape[1] * 8 // bits
    out = torch.empty(N, K, dtype=dtype, device=qweight.device) if out is None else out
    block_n, block_k = 16, 256
    _dequantize_kernel[(triton.cdiv(N, block_n), triton.cdiv(K, block_k))](
        qweight, scales, out, N, K, qweight.stride(0), scales.stride(0), out.stride(0),
        GROUP=group, BITS=bits, BLOCK_N=block_n, BLOCK_K=block_k)
    return out
