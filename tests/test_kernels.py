"""kvexp.core.kernels: references vs float64 textbook math, kernels vs references, write_kv bit-exact vs the
cache classes of kvexp.core.kv.

Kernel tests run on CUDA, or on CPU through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before the kernel modules are imported). Under the interpreter a bfloat16 tl.dot multiplies bfloat16's raw
uint16 storage, so bf16 queries run there only where the kernel's dots are float16 (quantized caches with
dequant="asm", whose PTX the interpreter replaces by Triton ops giving the same values); dense bf16 and the
conversion path (dequant="cvt") with bf16 queries are checked on the GPU (tests/README.md lists them). It also needs triton >= 3.7 when numpy >= 2.4 (triton#9171).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import types

import numpy as np
import pytest
import torch

from kvexp.core.kernels import decode_attention as da, kv_write as kw
from kvexp.core.kernels.decode_attention import decode_attention_ref
from kvexp.core.kv import FORMATS, SCALE_DTYPE, KVCache, QuantizedKVCache, dynamic_scale, quantize

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
CASES = [("dense", None), ("int8", "dynamic"), ("int8", "static"), ("fp8", "dynamic"), ("fp8", "static")]
ATTN_CASES = CASES + [("int4", "dynamic"), ("int4", "static")]
ATTN_TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}  # rel. error vs reference; observed ~1e-4 in fp16


def _version(text: str) -> tuple[int, int]:
    return tuple(int(part) for part in text.split(".")[:2])


def _kernel_skip_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (`pip install 'triton>=3.7'` runs the kernels on CPU via its interpreter)"
    import triton

    if CUDA:
        return None
    if type(da._split_kernel).__name__ != "InterpretedFunction":
        return ("triton was imported before tests/conftest.py could turn its interpreter on: "
                "run `TRITON_INTERPRET=1 pytest tests/test_kernels.py`")
    if _version(np.__version__) >= (2, 4) and _version(triton.__version__) < (3, 7):
        return (f"triton {triton.__version__}'s interpreter fails under numpy {np.__version__} (triton#9171, "
                "fixed in 3.7): pip install 'triton>=3.7' to run the kernels on CPU")
    return None


@pytest.fixture(scope="module")
def kernels() -> types.SimpleNamespace:
    """The kernels, on CUDA or through Triton's CPU interpreter; skips with the reason when neither works."""
    reason = _kernel_skip_reason()
    if reason:
        pytest.skip(reason)
    return types.SimpleNamespace(decode_attention=da.decode_attention, write_kv=kw.write_kv,
                                 rope_write=kw.rope_write)


def _cache(k: torch.Tensor, v: torch.Tensor, fmt: str, scales: str | None, dtype: torch.dtype) -> tuple:
    """float32 K/V [B, Hkv, T, D] -> (k, v, k_scale, v_scale) stored as fmt with kvexp.core.kv's math."""
    if fmt == "dense":
        return k.to(dtype), v.to(dtype), None, None
    f = FORMATS[fmt]
    if scales == "static":  # calibrated per head: amax over batch and tokens
        ks, vs = k.abs().amax((0, 2, 3)) / f.qmax, v.abs().amax((0, 2, 3)) / f.qmax
        return quantize(k, ks[None, :, None], f), quantize(v, vs[None, :, None], f), ks, vs
    ks, vs = dynamic_scale(k, f), dynamic_scale(v, f)
    return quantize(k, ks, f), quantize(v, vs, f), ks, vs


def _inputs(B, hq, hkv, T, D, fmt, scales, dtype, seed=0, device=DEVICE):
    """Random q [B, Hq, D] and a cache (never zeros; K at twice V's spread for peakier softmax)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, hq, D, generator=g).to(dtype)
    k, v = torch.randn(B, hkv, T, D, generator=g) * 2, torch.randn(B, hkv, T, D, generator=g)
    return [t if t is None else t.to(device) for t in (q, *_cache(k, v, fmt, scales, dtype))]


def _skip_bf16_on_cpu(dtype: torch.dtype, fmt: str, config: da.KernelConfig | None = None) -> None:
    """Skip where the interpreter would run a bfloat16 tl.dot (see the module docstring)."""
    fast = fmt != "dense" and (config or da.default_config(fmt, 64)).dequant != "cvt"
    if dtype == torch.bfloat16 and not CUDA and not fast:
        pytest.skip("Triton's interpreter computes bf16 tl.dot on raw uint16 storage: checked on GPU")


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _attention_f64(q, k, v, ks, vs, lengths, sm_scale):
    """Per sequence and query head, softmax(k q * sm_scale) @ v over the first lengths[b] positions, in
    float64 from x = stored * scale; query head h reads kv head h // (Hq / Hkv)."""
    def deq(x, s):
        if s is None:
            return x.double()
        if x.dtype == torch.uint8:  # int4: low nibble first, code - 8
            x = torch.stack(((x & 0xF).double() - 8, (x >> 4).double() - 8), -1).flatten(-2)
        s = s.double()[None, :, None] if s.ndim == 1 else s.double()
        return x.double() * s[..., None]
    k64, v64 = deq(k, ks), deq(v, vs)
    group = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for b, n in enumerate(lengths.tolist()):
        for h in range(q.shape[1]):
            w = torch.softmax(k64[b, h // group, :n] @ q[b, h].double() * sm_scale, 0)
            out[b, h] = w @ v64[b, h // group, :n]
    return out


@pytest.mark.parametrize("fmt,scales", ATTN_CASES)
def test_reference_matches_float64(fmt, scales):
    q, k, v, ks, vs = _inputs(3, 8, 2, 70, 32, fmt, scales, torch.float32, device="cpu")
    lengths = torch.tensor([1, 70, 33], dtype=torch.int32)
    out = decode_attention_ref(q, k, v, ks, vs, lengths, 0.2, fmt)
    assert out.dtype == torch.float32
    assert _rel_err(out, _attention_f64(q, k, v, ks, vs, lengths, 0.2)) < 1e-6


def test_reference_rejects_bad_inputs():
    q, k, v, ks, vs = _inputs(2, 4, 2, 16, 32, "int8", "dynamic", torch.float16, device="cpu")
    lengths = torch.tensor([3, 16], dtype=torch.int32)
    with pytest.raises(ValueError, match="fmt must be one of"):
        decode_attention_ref(q, k, v, ks, vs, lengths, 1.0, "int2")
    with pytest.raises(ValueError, match="takes no scales"):
        decode_attention_ref(q, k, v, ks, vs, lengths, 1.0, "dense")
    with pytest.raises(ValueError, match="needs torch.float8_e4m3fn"):
        decode_attention_ref(q, k, v, ks, vs, lengths, 1.0, "fp8")
    with pytest.raises(ValueError, match="Hq % Hkv"):
        decode_attention_ref(q[:, :3], k, v, ks, vs, lengths, 1.0, "int8")
    with pytest.raises(ValueError, match="lengths must be"):
        decode_attention_ref(q, k, v, ks, vs, lengths.float(), 1.0, "int8")


@pytest.mark.parametrize("num_splits", [None, 3, 7])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("fmt,scales", ATTN_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_decode_attention_matches_reference(kernels, dtype, fmt, scales, group, num_splits):
    _skip_bf16_on_cpu(dtype, fmt)
    # Lengths: 1; the full cache; 129 and 200 are multiples of neither BLOCK_N (64 or 128 here) nor of
    # the slice size; 7 slices of a short sequence leave some slices empty.
    q, k, v, ks, vs = _inputs(4, 2 * group, 2, 300, 64, fmt, scales, dtype, seed=group)
    lengths = torch.tensor([1, 300, 129, 200], dtype=torch.int32, device=DEVICE)
    out = torch.full_like(q, float("nan"))  # every element must be written
    kernels.decode_attention(q, k, v, ks, vs, lengths, 64 ** -0.5, fmt, num_splits, out=out)
    ref = decode_attention_ref(q, k, v, ks, vs, lengths, 64 ** -0.5, fmt)
    assert _rel_err(out, ref) < ATTN_TOL[dtype]


@pytest.mark.parametrize("fmt,scales", [("dense", None), ("int8", "dynamic")])
def test_merge_splits_the_head_dim_past_64_slices(kernels, fmt, scales):
    """Over 64 slices stage 2 reads a head in column tiles (MERGE_TILE): 100 slices of a 64-wide head are
    two programs of 32 columns each, most slices of the short sequence empty."""
    assert da._merge_tile(100, 64) == (128, 32)
    q, k, v, ks, vs = _inputs(2, 4, 1, 700, 64, fmt, scales, torch.float16, seed=100)
    lengths = torch.tensor([700, 90], dtype=torch.int32, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    kernels.decode_attention(q, k, v, ks, vs, lengths, 64 ** -0.5, fmt, 100, out=out)
    assert _rel_err(out, decode_attention_ref(q, k, v, ks, vs, lengths, 64 ** -0.5, fmt)) < 2e-3


@pytest.mark.parametrize("head_dim", [16, 32, 128])
@pytest.mark.parametrize("fmt,scales", [("dense", None), ("int8", "dynamic"), ("int4", "dynamic")])
def test_decode_attention_head_dims(kernels, fmt, scales, head_dim):
    if fmt == "int4" and head_dim < 32:
        pytest.skip("int4 needs head_dim >= 32 (tl.dot's K of 16 over D/2 bytes)")
    q, k, v, ks, vs = _inputs(2, 8, 2, 150, head_dim, fmt, scales, torch.float16, seed=head_dim)
    lengths = torch.tensor([150, 41], dtype=torch.int64, device=DEVICE)
    out = kernels.decode_attention(q, k, v, ks, vs, lengths, head_dim ** -0.5, fmt, 2)
    assert _rel_err(out, decode_attention_ref(q, k, v, ks, vs, lengths, head_dim ** -0.5, fmt)) < 2e-3


CONFIGS = [  # the tuner's block_n (and 16), both K loads, both dequant modes; warps and stages are inert under
    # the interpreter, which also runs no PTX: there the asm mode computes the same values with Triton ops
    da.KernelConfig(block_n=16, num_warps=1, num_stages=1, k_natural=True, norm_v_scale=False, dequant="asm"),
    da.KernelConfig(block_n=32, num_warps=2, num_stages=2, k_natural=True, dequant="asm"),
    da.KernelConfig(block_n=64, num_warps=8, num_stages=4, k_natural=False, norm_v_scale=False, dequant="asm"),
    da.KernelConfig(block_n=128, num_warps=4, num_stages=3, k_natural=True, dequant="asm", full_blocks=True),
    da.KernelConfig(block_n=64, num_warps=4, num_stages=3, k_natural=False, dequant="cvt", full_blocks=True),
    da.KernelConfig(block_n=32, num_warps=4, num_stages=3, k_natural=True, norm_v_scale=False, dequant="cvt"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("fmt,scales", [("dense", None), ("int8", "dynamic"), ("fp8", "static"), ("fp8", "dynamic"),
                                        ("int4", "dynamic")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_decode_attention_configs(kernels, dtype, fmt, scales, config):
    _skip_bf16_on_cpu(dtype, fmt, config)
    q, k, v, ks, vs = _inputs(3, 8, 2, 300, 64, fmt, scales, dtype, seed=config.block_n)
    lengths = torch.tensor([300, 17, 190], dtype=torch.int32, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    if fmt == "int4" and (config.block_n < 32 or config.num_warps < 2):  # wrong on the H200: refused
        with pytest.raises(ValueError, match="int4.*block_n >= 32"):
            kernels.decode_attention(q, k, v, ks, vs, lengths, 0.125, fmt, 3, out=out, config=config)
        return
    kernels.decode_attention(q, k, v, ks, vs, lengths, 0.125, fmt, 3, out=out, config=config)
    assert _rel_err(out, decode_attention_ref(q, k, v, ks, vs, lengths, 0.125, fmt)) < ATTN_TOL[dtype]


def test_kernel_config_rejects_bad_launches():
    for bad in (dict(block_n=8), dict(block_n=96), dict(num_warps=3), dict(num_stages=0), dict(dequant="bits")):
        with pytest.raises(ValueError, match="block_n a power of two"):
            da.KernelConfig(**{**dict(block_n=64, num_warps=4, num_stages=3, k_natural=False), **bad})


def test_default_config_keeps_block_bytes_across_head_dims():
    base = da.DEFAULT_CONFIGS["int8"]
    assert da.default_config("int8", da.TUNED_HEAD_DIM) is base
    assert da.default_config("int8", 2 * da.TUNED_HEAD_DIM).block_n == base.block_n // 2
    assert da.default_config("dense", 256).block_n == max(16, da.DEFAULT_CONFIGS["dense"].block_n // 4)
    assert da.default_config("dense", 16).block_n == min(128, 4 * da.DEFAULT_CONFIGS["dense"].block_n)
    for fmt, fields in da.WIDE_HEAD.items():  # measured faster at D 128: replace the format's there
        for name, value in fields.items():
            assert getattr(da.default_config(fmt, 2 * da.TUNED_HEAD_DIM), name) == value
            assert getattr(da.default_config(fmt, da.TUNED_HEAD_DIM // 2), name) == getattr(da.DEFAULT_CONFIGS[fmt],
                                                                                             name)


@pytest.mark.parametrize("config", [None, da.KernelConfig(64, 4, 3, False, norm_v_scale=False)], ids=str)
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_decode_attention_fp16_with_small_values(kernels, fmt, config):
    """V ~ 1e-3 makes per-token scales ~1e-5: p * s_v in fp16 would sink into subnormals (error 3.6e-3
    before the kernel normalized the scales per block; 1.8e-4 after), so fp16 normalizes whatever the
    config's norm_v_scale says."""
    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(4, 2, 300, 64, generator=g), torch.randn(4, 2, 300, 64, generator=g) * 1e-3
    q = torch.randn(4, 8, 64, generator=g).half().to(DEVICE)
    cache = [t.to(DEVICE) for t in _cache(k, v, fmt, "dynamic", torch.float16)]
    lengths = torch.tensor([1, 300, 129, 200], dtype=torch.int32, device=DEVICE)
    out = kernels.decode_attention(q, *cache, lengths, 0.125, fmt, 3, config=config)
    assert _rel_err(out, decode_attention_ref(q, *cache, lengths, 0.125, fmt)) < 1e-3


@pytest.mark.parametrize("impl", ["reference", "kernel"])
@pytest.mark.parametrize("fmt,tol", [("int8", 8e-3), ("fp8", 3.5e-2), ("int4", 0.14)])
def test_quantized_attention_close_to_dense(request, impl, fmt, tol):
    """Quantization error of the whole attention on random data: int8 measures 0.52-0.67% and fp8 ~2.6%;
    a V scale off by 1/128 gives int8 0.82-0.90%, swapped K/V scales 10-28%. int4 measures 11.9%; its V
    scale off by 8/7 (qmax 8 for 7) gives 18.7%, swapped K/V scales 15.3%."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 8, 64, generator=g)
    k, v = torch.randn(4, 2, 300, 64, generator=g), torch.randn(4, 2, 300, 64, generator=g)
    lengths = torch.tensor([1, 300, 129, 200], dtype=torch.int32)
    dense = decode_attention_ref(q, k, v, None, None, lengths, 64 ** -0.5, "dense")
    kq, vq, ks, vs = _cache(k, v, fmt, "dynamic", torch.float32)
    if impl == "reference":
        out = decode_attention_ref(q, kq, vq, ks, vs, lengths, 64 ** -0.5, fmt)
    else:
        kernels = request.getfixturevalue("kernels")
        args = [t.to(DEVICE) for t in (q.half(), kq, vq, ks, vs, lengths)]
        out = kernels.decode_attention(*args, 64 ** -0.5, fmt).cpu()
    assert _rel_err(out, dense) < tol


def test_best_configs_ranks_configs_correct_at_every_batch_by_summed_time():
    from kvexp.bench.kernels import best_configs

    def row(fmt, batch, config, time_us, correct=True):
        return dict(kv_format=fmt, batch=batch, config=str(config), **dataclasses.asdict(config),
                    time_us=time_us if correct else None, correct=correct)

    fast, steady, partial, broken = (da.KernelConfig(n, 4, 3, False) for n in (16, 32, 64, 128))
    rows = [row("int8", 1, fast, 10.0), row("int8", 8, fast, 99.0, correct=False),  # wrong at batch 8
            row("int8", 1, steady, 30.0), row("int8", 8, steady, 60.0),  # 90 in all: the pick
            row("int8", 1, partial, 20.0),  # never measured at batch 8
            row("int8", 1, broken, 40.0), row("int8", 8, broken, 55.0),  # 95 in all
            row("fp8", 1, steady, 5.0, correct=False)]  # no usable config: fp8 is left out
    assert best_configs(rows) == {"int8": steady}
    assert best_configs(rows + [row("int8", 8, partial, 65.0)]) == {"int8": partial}  # 85 now beats 90


def _junk(t: torch.Tensor, g: torch.Generator) -> None:
    """Fill t with random finite values, so that a write to the wrong place or a skipped write shows.
    Finite: Triton's interpreter round-trips whole tensors through numpy, which rewrites NaN payloads."""
    if t.dtype in (torch.int8, torch.uint8):
        t.copy_(torch.randint(-128, 128, t.shape, generator=g, dtype=torch.int8).view(t.dtype))
    else:
        t.copy_(torch.randn(t.shape, generator=g) * 10)


@pytest.mark.parametrize("n", [1, 3], ids=["decode", "prefill"])
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64], ids=["pos32", "pos64"])
@pytest.mark.parametrize("fmt,scales", ATTN_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_write_kv_matches_cache_classes(kernels, dtype, fmt, scales, pos_dtype, n):
    """n = 1 passes [B, Hkv, D] (decode's call), n = 3 [B, Hkv, n, D] (prefill's), the last sequence ending
    at the cache's end."""
    B, hkv, T, D = 3, 4, 10, 64
    g = torch.Generator().manual_seed(1)
    k, v = (torch.randn(B, hkv, n, D, generator=g) * 3).to(dtype), torch.randn(B, hkv, n, D, generator=g).to(dtype)
    k[0, 0, 0, :5], k[1, 1, -1], v[2, 0, 0, :3] = -0.0, 0.0, -1e-5  # signed zeros, the amax clamp, tiny negatives
    pos = torch.tensor([0, 5, T - n])
    ref, mine = _junk_caches(fmt, scales, dtype, B, hkv, T, D, g)
    ref.write(0, k, v, pos)  # the torch path: fused_write is off
    k_in, v_in = (k[:, :, 0], v[:, :, 0]) if n == 1 else (k, v)
    kernels.write_kv(k_in.to(DEVICE), v_in.to(DEVICE), *mine, pos.to(pos_dtype).to(DEVICE), fmt)
    for got, want in zip(mine, _layer0(ref)):
        assert torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8))


def _junk_caches(fmt: str, scales: str | None, dtype: torch.dtype, B: int, hkv: int, T: int, D: int,
                 g: torch.Generator) -> tuple:
    """A one-layer cache of the torch path (fused_write off) filled with junk, and the kernel's device copies of its
    values and dynamic scales ([k, v, k_scale, v_scale]: None for a dense cache, the static scales for a static one)."""
    static = (torch.rand(1, hkv, generator=g) + 0.01, torch.rand(1, hkv, generator=g) + 0.01)
    if fmt == "dense":
        ref = KVCache(1, B, hkv, T, D, dtype, "cpu")
    else:
        ref = QuantizedKVCache(1, B, hkv, T, D, dtype, "cpu", FORMATS[fmt], static if scales == "static" else None)
    for t in (ref.k + ref.v + ([] if scales != "dynamic" else ref.k_scale + ref.v_scale)):
        _junk(t, g)
    return ref, [t if t is None else t.clone().to(DEVICE) for t in _layer0(ref, scales_too=True)]


def _layer0(ref, scales_too: bool = False) -> list:
    """Layer 0's values, then its scales (Nones for a dense cache when scales_too, else left out)."""
    if not hasattr(ref, "k_scale"):
        return [ref.k[0], ref.v[0]] + ([None, None] if scales_too else [])
    return [ref.k[0], ref.v[0], ref.k_scale[0], ref.v_scale[0]]


@pytest.mark.parametrize("shape", [(6, 2, 128), (8, 2, 64)], ids=["qwen-heads", "llama-heads"])  # G 3 / 4
@pytest.mark.parametrize("n", [1, 3], ids=["decode", "extend"])
@pytest.mark.parametrize("fmt,scales", ATTN_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_rope_write_is_split_heads_then_the_cache_write(kernels, dtype, fmt, scales, n, shape):
    """One launch from the q|k|v projection: the rotated queries and the cache's bytes equal the torch path's
    (fused.split_heads, then the cache class's write); on a GPU an FMA may move a rotated value by one ulp of the
    model dtype, so there the queries are held to that and the stored codes to one step on a few elements."""
    from kvexp.core import fused

    hq, hkv, D = shape
    B, T = 3, 10
    g = torch.Generator().manual_seed(2)
    qkv = (torch.randn(B, n, (hq + 2 * hkv) * D, generator=g) * 3).to(dtype)
    pos = torch.tensor([0, 5, T - n])
    angles = (pos[:, None] + torch.arange(n)).float()[..., None] * (10000.0 ** (-torch.arange(0, D, 2) / D))
    emb = torch.cat((angles, angles), -1)[:, None]  # [B, 1, n, D]
    cos, sin = emb.cos(), emb.sin()
    ref, mine = _junk_caches(fmt, scales, dtype, B, hkv, T, D, g)
    q_ref, k, v = fused.split_heads(qkv, hq, hkv, D, cos, sin)
    ref.write(0, k, v, pos)
    q = kernels.rope_write(qkv.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE), hq, *mine, pos.to(DEVICE), fmt)
    assert q.shape == q_ref.shape and q.is_contiguous()
    if not CUDA:
        assert torch.equal(q.cpu(), q_ref)
        for got, want in zip(mine, _layer0(ref)):
            assert torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8))
        return
    # one step of the model dtype, plus float32 rounding of the two products where they cancel (|x| < 20 here)
    near = (q.cpu().float() - q_ref.float()).abs() <= _ulp(q_ref) + 20 * 2.0 ** -23
    assert near.all() and (q.cpu() != q_ref).float().mean() < 0.05
    for got, want in zip(mine, _layer0(ref)):
        got = got.cpu()
        if got.dtype == torch.uint8:  # int4: the two nibbles, codes one step apart at most
            got, want = torch.stack((got & 15, got >> 4)), torch.stack((want & 15, want >> 4))
        diff = (got.float() - want.float()).abs()
        step = 1.0 if got.dtype in (torch.int8, torch.uint8) else _ulp(want)  # a code, or one step of the float
        assert (diff <= step).all() and (diff > 0).float().mean() < 0.02


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """One step of x's float format at each element (e4m3: 2^-3 relative, 2^-9 at subnormals; bf16/fp16: eps)."""
    rel, tiny = (2.0 ** -3, 2.0 ** -9) if x.dtype == torch.float8_e4m3fn else (torch.finfo(x.dtype).eps, 0.0)
    return (x.float().abs() * rel).clamp_min(tiny) if tiny else x.float().abs() * rel + torch.finfo(x.dtype).tiny


def test_rope_write_rejects_bad_inputs(kernels):
    qkv = torch.zeros(2, 1, (4 + 2 * 2) * 8, dtype=torch.float16, device=DEVICE)
    cache = torch.zeros(2, 2, 6, 8, dtype=torch.float16, device=DEVICE)
    cos = torch.zeros(2, 1, 1, 8, device=DEVICE)
    pos = torch.zeros(2, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="cos/sin"):
        kernels.rope_write(qkv, cos[..., :4], cos[..., :4], 4, cache, cache, None, None, pos, "dense")
    with pytest.raises(ValueError, match="caches"):
        kernels.rope_write(qkv, cos, cos, 4, cache.to(torch.int8), cache.to(torch.int8), None, None, pos, "dense")
    with pytest.raises(ValueError, match="qkv"):
        kernels.rope_write(qkv.float(), cos, cos, 4, cache, cache, None, None, pos, "dense")


@pytest.mark.parametrize("scale", [1.0, 0.75])
@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4"])
def test_write_kv_rounding_is_exact_for_every_bf16_value(kernels, fmt, scale):
    """Every bfloat16 in [-480, 480] through a static scale: scale 1 lands on every rounding tie of the
    formats (k + 0.5 for int8 and int4, midpoints between e4m3 values, subnormals) and on int4's clamp to
    [-8, 7]; 0.75 exercises the division."""
    values = torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    values = values[values.float().abs() <= 480]
    x = torch.cat([values, values[: (-values.numel()) % 256]]).view(-1, 1, 256)  # [rows, Hkv=1, D=256]
    s = torch.full((1,), scale)
    cache = torch.zeros(x.shape[0], 1, 2, 128 if FORMATS[fmt].packed else 256, dtype=FORMATS[fmt].storage, device=DEVICE)
    pos = torch.ones(x.shape[0], dtype=torch.int64, device=DEVICE)
    kernels.write_kv(x.to(DEVICE), x.to(DEVICE), cache, cache.clone(), s.to(DEVICE), s.to(DEVICE), pos, fmt)
    want = quantize(x, s[None, :], FORMATS[fmt])
    assert torch.equal(cache[:, :, 1].cpu().view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_stored_scale_is_the_same_for_division_and_reciprocal_multiply(dtype):
    """kv.dynamic_scale divides amax by a Python float: CPU torch divides, CUDA torch multiplies by the
    reciprocal (div_true_kernel_cuda). For every fp16/bf16 amax both round to the same bf16 scale, so
    write_kv's IEEE division matches the cache classes on either device."""
    bits = torch.arange(1, 0x7C00 if dtype == torch.float16 else 0x7F80, dtype=torch.int32).to(torch.int16)
    amax = bits.view(dtype).float().clamp_min(1e-6)
    for qmax in (FORMATS["int8"].qmax, FORMATS["fp8"].qmax):
        divided = amax / torch.full_like(amax, qmax)
        multiplied = amax * torch.tensor(1.0 / qmax, dtype=torch.float32)
        assert torch.equal(divided.to(SCALE_DTYPE), multiplied.to(SCALE_DTYPE))


needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_decode_step_replays_from_a_cuda_graph(kernels):
    """write_kv + decode_attention captured once and replayed with new inputs, positions and lengths
    written into the same device tensors: capture fails on any host sync, stale lengths show vs the ref."""
    B, hq, hkv, T, D, fmt = 4, 32, 8, 2048, 64, "int8"
    _, kc, vc, ks, vs = _inputs(B, hq, hkv, T, D, fmt, "dynamic", torch.bfloat16, seed=3)  # a full cache
    q = torch.randn(B, hq, D, dtype=torch.bfloat16, device="cuda")
    k_new, v_new = (torch.randn(B, hkv, D, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    pos = torch.tensor([5, 100, 1000, 2040], device="cuda")
    lengths = (pos + 1).int()
    out = torch.empty_like(q)

    def step():
        kernels.write_kv(k_new, v_new, kc, vc, ks, vs, pos, fmt)
        kernels.decode_attention(q, kc, vc, ks, vs, lengths, D ** -0.5, fmt, out=out)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    b, f = torch.arange(B, device="cuda"), FORMATS[fmt]
    for advance in (1, 2, 4):
        for t in (q, k_new, v_new):
            t.copy_(torch.randn_like(t))
        pos += advance
        lengths.copy_(pos + 1)
        graph.replay()
        scale = dynamic_scale(k_new, f)
        assert torch.equal(ks[b, :, pos], scale) and torch.equal(kc[b, :, pos], quantize(k_new, scale, f))
        ref = decode_attention_ref(q, kc, vc, ks, vs, lengths, D ** -0.5, fmt)
        assert _rel_err(out, ref) < ATTN_TOL[torch.bfloat16]


@pytest.mark.gpu
@needs_cuda
def test_offsets_past_2_31_elements(kernels):
    """The last sequence of a 9 x 8 x 2^18 x 128 int8 cache starts past 2^31 elements: int32 offsets would wrap."""
    B, hq, hkv, T, D, n = 9, 32, 8, 2 ** 18, 128, 3000
    if torch.cuda.mem_get_info()[0] < 8e9:
        pytest.skip("needs 8 GB of free GPU memory")
    kc, vc = (torch.zeros(B, hkv, T, D, dtype=torch.int8, device="cuda") for _ in range(2))
    ks, vs = (torch.ones(B, hkv, T, dtype=SCALE_DTYPE, device="cuda") for _ in range(2))
    _, kc[-1:, :, :n], vc[-1:, :, :n], ks[-1:, :, :n], vs[-1:, :, :n] = _inputs(
        1, hq, hkv, n, D, "int8", "dynamic", torch.bfloat16, seed=4)
    k_new, v_new = (torch.randn(B, hkv, D, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    kernels.write_kv(k_new, v_new, kc, vc, ks, vs, torch.full((B,), T - 1, device="cuda"), "int8")
    scale = dynamic_scale(k_new[-1], FORMATS["int8"])
    assert torch.equal(kc[-1, :, T - 1], quantize(k_new[-1], scale, FORMATS["int8"]))
    q = torch.randn(B, hq, D, dtype=torch.bfloat16, device="cuda")
    lengths = torch.tensor([1] * (B - 1) + [n], dtype=torch.int32, device="cuda")
    out = kernels.decode_attention(q, kc, vc, ks, vs, lengths, D ** -0.5, "int8")
    ref = decode_attention_ref(q[-1:], kc[-1:, :, :n], vc[-1:, :, :n], ks[-1:, :, :n], vs[-1:, :, :n],
                               lengths[-1:], D ** -0.5, "int8")
    assert _rel_err(out[-1:], ref) < ATTN_TOL[torch.bfloat16]


@pytest.mark.gpu
@needs_cuda
def test_bench_decode_attention_checks_every_method(kernels):
    from kvexp.bench.kernels import bench_decode_attention

    rows = bench_decode_attention(batch_sizes=(2,), lengths=(1000,), hq=8, hkv=2, d=64)
    assert {r["method"] for r in rows} == {"sdpa_gqa", "sdpa_expand", "sdpa_int8_dequant", "kernel_dense",
                                           *(f"kernel_{f}{s}" for f in ("int8", "fp8", "int4") for s in (
                                               "", "_asm" if da.default_config(f, 64).dequant == "cvt" else "_cvt"))}
    assert all(r["correct"] and r["time_us"] > 0 and r["gbps"] > 0 for r in rows), rows
    assert all(r["config"] for r in rows if r["method"].startswith("kernel_")), rows


@pytest.mark.gpu
@needs_cuda
def test_tune_decode_attention_on_a_small_grid(kernels, monkeypatch):
    from kvexp.bench import kernels as bench

    monkeypatch.setattr(bench, "GRID", dict(k_natural=(False, True), block_n=(64,), num_warps=(4,)))
    monkeypatch.setattr(bench, "STAGE_ALTERNATIVES", (2,))
    monkeypatch.setattr(bench, "STAGE_TOP", 1)
    rows = bench.tune_decode_attention(batch_sizes=(1, 2), length=1000, hq=8, hkv=2)
    # per format: 2 grid configs, the fastest at num_stages 2, and for int8/fp8 the best without V normalization
    assert len(rows) == 2 * (3 + 4 + 4), [(r["kv_format"], r["config"]) for r in rows]
    assert all(r["correct"] and r["error"] is None for r in rows), [r for r in rows if not r["correct"]]
    best = bench.best_configs(rows)
    assert set(best) == {"dense", "int8", "fp8"} and all(c.block_n == 64 for c in best.values())


def test_sweep_summary_fits_slopes_and_break_even():
    from kvexp.bench.kernels import SWEEP_LENGTHS, sweep_summary

    rows = [dict(hq=32, hkv=8, head_dim=64, batch=8, seq_len=t, method=m, time_us=a + b * t / 1000)
            for t in SWEEP_LENGTHS for m, a, b in (("sdpa_gqa", 5, 4), ("kernel_int8", 9, 2), ("kernel_fp8", 2, 5))]
    got = {r["method"]: r for r in sweep_summary(rows)}
    assert got["kernel_int8"]["slope_us_per_1k"] == pytest.approx(2) and got["kernel_int8"]["slope_vs_baseline"] == 0.5
    assert got["kernel_int8"]["break_even_tokens"] == pytest.approx(2000)  # 9 + 2x = 5 + 4x at x = 2k tokens
    assert got["kernel_int8"]["first_faster_measured"] == 2048
    assert got["kernel_fp8"]["break_even_tokens"] is None  # faster at first, slower past 3k: never breaks even


@pytest.mark.parametrize("V", [7, 2048, 5000, 128256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_rows_is_torch_argmax_with_ties_to_the_first(V, dtype):
    from kvexp.core.kernels.argmax import argmax_rows

    if _kernel_skip_reason():
        pytest.skip(_kernel_skip_reason())
    g = torch.Generator().manual_seed(V)
    x = torch.randn(3, V, generator=g).to(dtype)
    x[1, V // 3] = x[1, V - 1] = 50  # a tie across chunks: the first wins
    x[2, :] = -1.0  # all equal: index 0
    x[2, V - 1] = -0.5  # unless the last is larger
    out = argmax_rows(x.to(DEVICE))
    assert out.dtype == torch.int64 and torch.equal(out.cpu(), x.float().argmax(-1))


def test_pdl_only_where_the_gpu_has_it_and_the_switch_is_on(monkeypatch):
    """kernels.pdl gates programmatic dependent launch: never on a CPU tensor (the interpreter runs no PTX), on CUDA
    from sm90 when triton has griddepcontrol, and never inside pdl_switch(False), which puts the switch back after."""
    from kvexp.core import kernels

    monkeypatch.setattr(kernels, "_pdl", True)
    monkeypatch.setattr(kernels, "_triton_has_pdl", lambda: True)
    assert not kernels.pdl(torch.zeros(1))
    cuda = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    for capability, expected in (((8, 0), False), ((8, 9), False), ((9, 0), True), ((10, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert kernels.pdl(cuda) is expected, capability
    with kernels.pdl_switch(False):
        assert not kernels.pdl(cuda) and not kernels._pdl
    assert kernels._pdl and kernels.pdl(cuda)
    monkeypatch.setattr(kernels, "_triton_has_pdl", lambda: False)
    assert not kernels.pdl(cuda)  # a triton before 3.3
