"""KV-cache quantization against float64 references on fresh random inputs."""
import math

import pytest
import torch

from conftest import build_engine
from kvexp.core.kv import FORMATS, SCALE_DTYPE, KVCache, QuantizedKVCache, dequantize, dynamic_scale, quantize


def _attention64(q, k, v):
    """q [B, H, D], k/v [B, H, T, D] -> [B, H, D] in float64."""
    s = torch.einsum("bhd,bhtd->bht", q.double(), k.double()) / math.sqrt(q.shape[-1])
    return torch.einsum("bht,bhtd->bhd", s.softmax(-1), v.double())


# Each format's largest value from its definition, not from kvexp's constants, so a wrong qmax in the code shows
FORMAT_MAX = {"int8": 2 ** 7 - 1, "int4": 2 ** 3 - 1, "fp8": torch.finfo(torch.float8_e4m3fn).max}
E4M3_MANTISSA_BITS, E4M3_MIN_NORMAL_EXP = 3, -6
FP32_SLACK = 4 * torch.finfo(torch.float32).eps  # relative: the float32 divide and multiply around the rounding


def _half_step(x: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """Per-element bound on |dequantize(quantize(x)) - x| (x [..., D], scale broadcastable to it): half a step of
    the scale for the integer formats; half an e4m3 ulp of x / scale for fp8 (spacing 2^-3 relative to the binade,
    fixed 2^-9 below the smallest normal 2^-6). A saturated |x / scale| <= qmax (1 + 2^-8) (the bf16 rounding of
    the scale) stays inside it: 2^-8 qmax is < 1/2 step for int8/int4 and < 1/2 ulp of 448 for fp8."""
    if fmt == "fp8":
        exp = torch.log2((x / scale).abs().clamp_min(2.0 ** E4M3_MIN_NORMAL_EXP)).floor()
        step = scale * 2.0 ** (exp - E4M3_MANTISSA_BITS)
    else:
        step = scale.expand_as(x)
    return step / 2 + FP32_SLACK * x.abs()


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8"])
def test_round_trip_error_is_within_half_a_step(fmt):
    f = FORMATS[fmt]
    x = torch.randn(4, 2, 33, 64) * torch.rand(4, 2, 33, 1) * 10  # per-vector magnitudes differ
    scale = dynamic_scale(x, f)
    assert scale.dtype == SCALE_DTYPE
    # the stored scale is each vector's amax over the format's largest value, rounded to bf16 (8 significant bits)
    ideal = x.abs().amax(-1) / FORMAT_MAX[fmt]
    assert ((scale.float() / ideal - 1).abs() <= torch.finfo(SCALE_DTYPE).eps / 2).all()
    y = dequantize(quantize(x, scale, f), scale, f, torch.float32)
    assert ((y - x).abs() <= _half_step(x, scale.float()[..., None], fmt)).all()


def test_int4_packs_two_values_per_byte():
    f = FORMATS["int4"]
    x = torch.randn(3, 64)
    q = quantize(x, dynamic_scale(x, f), f)
    assert q.shape == (3, 32) and q.dtype == torch.uint8


def _stored_scale(x: torch.Tensor, fmt: str, static: bool) -> torch.Tensor:
    """The scale a correct cache stores for x [B, H, T, D], broadcastable to it: static, the head's amax over the
    format's largest value (float32); dynamic, each vector's, rounded to bf16 as kvexp stores it."""
    if static:
        return (x.abs().amax((0, 2, 3)) / FORMAT_MAX[fmt])[None, :, None, None]
    return (x.abs().amax(-1, keepdim=True) / FORMAT_MAX[fmt]).to(SCALE_DTYPE).float()


@pytest.mark.parametrize("fmt,static", [("int8", False), ("fp8", False), ("int8", True), ("int4", False)])
def test_attention_over_quantized_cache(fmt, static):
    B, H, T, D = 2, 4, 100, 64
    torch.manual_seed(0)
    k, v, q = torch.randn(B, H, T, D), torch.randn(B, H, T, D), torch.randn(B, H, D)
    s_k, s_v = _stored_scale(k, fmt, static), _stored_scale(v, fmt, static)
    scales = (s_k.flatten()[None], s_v.flatten()[None]) if static else None  # static: [L=1, H]
    cache = QuantizedKVCache(1, B, H, T, D, torch.float32, "cpu", FORMATS[fmt], scales)
    cache.write(0, k, v, torch.zeros(B, dtype=torch.long))
    kq, vq = cache.read(0, T)
    bound_k, bound_v = _half_step(k, s_k, fmt), _half_step(v, s_v, fmt)
    assert ((kq - k).abs() <= bound_k).all() and ((vq - v).abs() <= bound_v).all()
    # Rounding errors spread evenly over +-bound have rms bound / sqrt(3); the attention output's relative error
    # is then close to the keys' and values' relative rms errors combined (measured: 0.86x-1.08x of it over
    # seeds and formats), so a step twice too coarse (a qmax/2 scale) lands near 2x and fails.
    predicted = math.sqrt(((bound_k ** 2).mean() / (k ** 2).mean() + (bound_v ** 2).mean() / (v ** 2).mean()) / 3)
    ref = _attention64(q, k, v)
    err = (_attention64(q, kq, vq) - ref).norm() / ref.norm()
    assert 0.6 * predicted < err < 1.4 * predicted, (err, predicted)  # quantized (not a copy), and as close


def test_writes_land_at_each_sequences_position():
    B, H, T, D = 3, 2, 10, 8
    for cache in (KVCache(1, B, H, T, D, torch.float32, "cpu"),
                  QuantizedKVCache(1, B, H, T, D, torch.float32, "cpu", FORMATS["int8"])):
        k = torch.randn(B, H, 2, D) + 5
        pos = torch.tensor([0, 3, 7])
        cache.write(0, k, k, pos)
        kr, _ = cache.read(0, T)
        for b, p in enumerate(pos.tolist()):
            assert torch.allclose(kr[b, :, p:p + 2], k[b], rtol=0.02)
            untouched = [t for t in range(T) if not p <= t < p + 2]
            assert (kr[b, :, untouched] == 0).all()


@pytest.mark.parametrize("quant,expected", [("fp16", 2 * 2 * 2 * 32 * 4),  # tiny: 2 layers, 2 kv heads, d 32, fp32
                                            ("int8kv", 2 * 2 * 2 * (32 + 2)), ("int4kv", 2 * 2 * 2 * (16 + 2)),
                                            ("int8kv_static", 2 * 2 * 2 * 32)])
def test_kv_bytes_per_token_measured_equals_formula(quant, expected):
    engine = build_engine(f"quant={quant}")
    mem = engine.memory()
    assert mem.kv_bytes_per_token == mem.kv_bytes_per_token_formula == expected


def _sharpen(engine):
    """Random-init tiny weights give near-uniform outputs; scale them up so quantization error shows."""
    with torch.no_grad():
        for name, p in engine.model.named_parameters():
            if p.dim() > 1:
                p.mul_(8.0)


def test_kv_faithful_scoring_sees_the_quantized_cache():
    gen = torch.Generator().manual_seed(2)
    reqs = [(torch.randint(3, 500, (40,), generator=gen).tolist(), torch.randint(3, 500, (8,), generator=gen).tolist())
            for _ in range(3)]
    scores = {}
    for quant in ("fp16", "int8kv", "int4kv"):
        engine = build_engine(f"quant={quant}")
        _sharpen(engine)
        one = engine.continuation_logprobs(reqs, kv_faithful=False)
        faithful = engine.continuation_logprobs(reqs, kv_faithful=True)
        scores[quant] = (torch.stack(one), torch.stack(faithful))
    fp_one, fp_faithful = scores["fp16"]
    assert torch.allclose(fp_one, fp_faithful, atol=1e-4)  # fp cache: both modes agree
    for quant in ("int8kv", "int4kv"):
        one, faithful = scores[quant]
        assert torch.equal(one, fp_one)  # one-pass never reads the cache: blind to KV quantization
        assert (faithful - fp_faithful).abs().max() > 1e-4  # the faithful mode sees it
    d8 = (scores["int8kv"][1] - fp_faithful).abs().mean()
    d4 = (scores["int4kv"][1] - fp_faithful).abs().mean()
    assert d4 > 3 * d8  # and coarser formats move scores more


@pytest.mark.parametrize("fmt,static", [("dense", False), ("int8", False), ("int8", True), ("fp8", False),
                                        ("fp8", True), ("int4", False), ("int4", True)])
def test_fused_prefill_write_is_bit_exact(fmt, static):
    """A prefill (n = 7 tokens, ragged start positions) through fused_write=True (the Triton kernel; CPU: its
    interpreter) stores the same bits as the torch path."""
    pytest.importorskip("triton")
    from kvexp.core.kernels import decode_attention as da

    if not torch.cuda.is_available() and type(da._split_kernel).__name__ != "InterpretedFunction":
        pytest.skip("needs CUDA or Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(7)
    B, hkv, T, D, n = 2, 2, 16, 64, 7
    k, v = (torch.randn(B, hkv, n, D, generator=g).to(torch.bfloat16).to(device) for _ in range(2))
    pos = torch.tensor([0, T - n], device=device)
    scales = (torch.rand(1, hkv, generator=g) + 0.01, torch.rand(1, hkv, generator=g) + 0.01) if static else None

    def cache(fused: bool):
        args = (1, B, hkv, T, D, torch.bfloat16, device)
        if fmt == "dense":
            return KVCache(*args, fused_write=fused)
        return QuantizedKVCache(*args, fmt=FORMATS[fmt], static_scales=scales, fused_write=fused)

    torch_path, fused = cache(False), cache(True)
    torch_path.write(0, k, v, pos)
    fused.write(0, k, v, pos)
    for want, got in zip(torch_path.tensors(), fused.tensors()):
        assert torch.equal(want.view(torch.uint8), got.view(torch.uint8))
