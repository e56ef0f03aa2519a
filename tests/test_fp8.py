"""FP8 (e4m3) linears: the reference rounding, its error against float64, the presets on engine=torch (CPU:
numerics-only), static activation scales through ModelOpt (mocked at mtq.quantize), the sm89 refusal, and on a
sm89+ GPU the kernels against the reference."""
from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from conftest import build_engine, make_spec
from kvexp.core.fp8 import Fp8Linear, check_device, quantize_weight
from kvexp.core.kernels.wq_matmul import E4M3, E4M3_MAX, quantize_rows_ref
from kvexp.errors import ConfigError, UnsupportedConfig

SM89 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
gpu = pytest.mark.skipif(not SM89, reason="needs an sm89+ GPU (the Triton interpreter mis-rounds e4m3 casts)")
CPU = ("engine.device=cpu",)  # the numerics-only runs, also on a GPU host (auto would pick the GPU there)

# every finite e4m3fn value, for an independent nearest-value check
GRID = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
GRID = GRID[GRID.isfinite()].unique()


def _nearest_e4m3(y: torch.Tensor) -> torch.Tensor:
    """The grid value nearest to each y (ties: the even mantissa, i.e. the even code), by brute force."""
    y = y.double().clamp(-E4M3_MAX, E4M3_MAX)
    d = (y[..., None] - GRID.double()).abs()
    best = d.min(-1, keepdim=True).values
    cand = torch.where(d == best, GRID.double(), torch.nan)
    codes = cand.float().nan_to_num(0).to(E4M3).view(torch.uint8).long()  # among ties prefer the even code
    pick = torch.where(d == best, (codes % 2 == 0).double() + 1, 0.0).argmax(-1, keepdim=True)
    return cand.gather(-1, pick)[..., 0].float()


def test_quantize_rows_ref_is_round_to_nearest_with_amax_scale():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 96, generator=gen) * torch.logspace(-3, 2, 7)[:, None]
    q, scale = quantize_rows_ref(x)
    assert q.dtype == E4M3 and scale.dtype == torch.float32
    torch.testing.assert_close(scale, x.abs().amax(-1) / E4M3_MAX, rtol=1e-7, atol=0)
    assert torch.equal(q.float().abs().amax(-1), torch.full((7,), E4M3_MAX))  # each row's amax maps to 448
    inv = torch.full((7,), E4M3_MAX) / x.abs().amax(-1)  # the defined rounding: x times 448 / amax, to nearest
    assert torch.equal(q.float(), _nearest_e4m3(x * inv[:, None]))


def test_static_scale_saturates_and_zero_rows_stay_zero():
    x = torch.tensor([[1.0, -3.0, 1000.0, -1000.0], [0.0, 0.0, 0.0, 0.0]])
    q, scale = quantize_rows_ref(x, torch.tensor(1.0 / 448))  # covers |x| <= 1: the rest saturates
    assert torch.equal(scale, torch.full((2,), 1.0 / 448))
    assert q[0].float().tolist() == [448.0, -448.0, 448.0, -448.0]
    q, scale = quantize_rows_ref(x)
    assert torch.equal(q[1].float(), torch.zeros(4)) and scale[1] > 0


@pytest.mark.parametrize("activations", [False, True])
def test_reference_linear_is_the_e4m3_math(activations):
    """The layer's output equals float64 math on e4m3-rounded weights (and activations), to float32 rounding, and
    sits within e4m3's precision (2^-4 relative per value) of the dense float64 product."""
    gen = torch.Generator().manual_seed(1)
    dense = nn.Linear(256, 80)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(80, 256, generator=gen) * 0.05)
    x = torch.randn(12, 256, generator=gen)
    layer = Fp8Linear.from_linear(dense, activations)
    qw, sw = quantize_weight(dense.weight.detach())
    w = qw.double() * sw.double()[:, None]
    xd = x.double()
    if activations:
        qx, sx = quantize_rows_ref(x)
        xd = qx.double() * sx.double()[:, None]
    expect = xd @ w.T + dense.bias.double()
    got = layer(x)
    torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-5)
    exact = x.double() @ dense.weight.double().T + dense.bias.double()
    err = ((got.double() - exact).norm() / exact.norm()).item()
    assert 0.005 < err < (0.05 if activations else 0.035), err


def test_concat_is_the_layers_side_by_side():
    gen = torch.Generator().manual_seed(2)
    parts = [nn.Linear(64, n) for n in (32, 16, 16)]
    scales = [torch.tensor(s) for s in (0.01, 0.02, 0.015)]
    layers = [Fp8Linear.from_linear(p, True, s) for p, s in zip(parts, scales)]
    fused = Fp8Linear.concat(layers)
    assert fused.input_scale == torch.tensor(0.02)  # one input, one scale: the widest
    x = torch.randn(5, 64, generator=gen) * 0.005  # inside every scale's range: no saturation differs
    one_scale = [Fp8Linear(m.qweight, m.scales, True, torch.tensor(0.02), m.bias)(x) for m in layers]
    torch.testing.assert_close(fused(x), torch.cat(one_scale, -1), rtol=0, atol=0)
    assert Fp8Linear.concat([layers[0], Fp8Linear.from_linear(parts[1], False)]) is None


# ---- the presets on engine=torch ----
def _continuation(engine):
    return engine.continuation_logprobs([([5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16])], kv_faithful=False)[0]


def test_fp8_presets_run_on_cpu_as_numerics_only_runs():
    ref = build_engine("quant=fp16", *CPU)
    base = _continuation(ref)
    for quant, layers in (("fp8_weights", "auto"), ("fp8", "fp8")):
        engine = build_engine(f"quant={quant}", "quant.calib.dataset=builtin", *CPU)
        spec = engine.spec
        assert spec.build.numerics_only and spec.build.weights.activations == layers
        fused = engine.model.model.layers[0].self_attn.qkv
        assert isinstance(fused, Fp8Linear) and fused.kernel == "reference"
        assert fused.activations == (layers == "fp8") and fused.input_scale is None
        logp = _continuation(engine)
        kl = (base.exp() * (base - logp)).sum(-1).mean().item()
        assert 1e-7 < kl < 5e-3, (quant, kl)  # changed by e4m3 rounding, but only by a little
        # the kernel choice that a CUDA build makes runs through the same call on every packed layer (it once
        # passed an int4-only argument that Fp8Linear.prepare refused, which only a GPU run saw)
        n_fused = 4 * len(engine.model.model.layers)  # q|k|v, o, gate|up and down of every layer
        assert engine.model.prepare_kernels(int4="triton") == {"fp8.reference": n_fused}
    assert not ref.spec.build.numerics_only


def test_run_tags_mark_numerics_only():
    from kvexp.job import run_tags

    assert run_tags(make_spec("quant=fp8_weights", *CPU))["kvexp.numerics_only"] == "true"
    assert "kvexp.numerics_only" not in run_tags(make_spec("quant=fp16", *CPU))


@pytest.mark.parametrize("overrides,match", [
    (["quant.activations.dtype=fp8"], "quant.activations.dtype=fp8: fp8 activations need fp8 weights"),
    (["quant=fp8_weights", "quant.activations.scale=static"], "quant.activations.scale=static"),
    (["quant=fp8", "quant.weights.algo=awq"], "quant.weights"),
    (["quant=fp8", "engine=hf"], "quant.weights .*engine=hf; supported by engine=.*torch"),
    (["quant=fp8_weights", "engine=trtllm"], r"quant.activations \(dtype=auto, scale=dynamic\) with fp8 weights: "
                                             "not supported by engine=trtllm; supported by engine=torch"),
])
def test_fp8_config_errors_name_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match) as err:
        make_spec(*overrides)
    assert "\n" not in str(err.value)


def test_fp8_is_refused_below_sm89_naming_the_gpu_and_what_runs_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-40GB")
    with pytest.raises(UnsupportedConfig) as err:
        check_device(torch.device("cuda", 0), "quant=fp8")
    assert str(err.value) == ("quant=fp8: fp8 needs an sm89+ GPU (L4, L40S, H100, H200) and NVIDIA A100-SXM4-40GB "
                              "is sm80; run quant=int8kv (8-bit KV cache) or quant=awq (int4 weights) there")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_device(torch.device("cuda", 0), "quant=fp8")
    check_device(torch.device("cpu"), "quant=fp8")  # the CPU runs the reference


def test_torch_engine_checks_the_device_for_fp8_weights(monkeypatch):
    from kvexp.core import fp8
    from kvexp.engines.torch_engine import TorchEngine

    seen = []
    monkeypatch.setattr(fp8, "check_device", lambda device, what: seen.append((device.type, what)))
    specs = [make_spec("quant=fp8_weights", *CPU), make_spec("quant=int8kv", *CPU)]  # validate() checks them once
    assert seen == [("cpu", "quant=fp8_weights")]
    for spec in specs:
        TorchEngine.check_supported(spec)
    assert seen == [("cpu", "quant=fp8_weights")] * 2


# ---- static activation scales through ModelOpt (mocked at mtq.quantize: ModelOpt is not installed here) ----
def _fake_modelopt(monkeypatch, calls):
    """mtq with FP8_DEFAULT_CFG and a quantize() doing max calibration of every nn.Linear's input, as ModelOpt's
    "max" algorithm does: module.input_quantizer._amax / .is_enabled after the forward loop."""
    mtq = types.ModuleType("modelopt.torch.quantization")
    mtq.FP8_DEFAULT_CFG = {"quant_cfg": {"*input_quantizer": {"num_bits": (4, 3), "axis": None}}, "algorithm": "max"}

    def quantize(model, cfg, forward_loop):
        calls.append(cfg)
        hooks = []
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.input_quantizer = types.SimpleNamespace(is_enabled=True, _amax=torch.tensor(0.0))

                def hook(mod, args):
                    mod.input_quantizer._amax = torch.maximum(mod.input_quantizer._amax, args[0].abs().amax())
                hooks.append(m.register_forward_pre_hook(hook))
        forward_loop(model)
        for h in hooks:
            h.remove()
        return model

    mtq.quantize = quantize
    root, sub = types.ModuleType("modelopt"), types.ModuleType("modelopt.torch")
    root.torch, sub.quantization = sub, mtq
    for mod in (root, sub, mtq):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)


def test_fp8_static_calibrates_input_scales_through_modelopt(monkeypatch, tmp_path):
    calls = []
    _fake_modelopt(monkeypatch, calls)
    overrides = ("quant=fp8_static", "quant.calib.dataset=builtin", f"cache_dir={tmp_path}", *CPU)
    engine = build_engine(*overrides)
    assert len(calls) == 1 and calls[0]["algorithm"] == "max"
    layer = engine.model.model.layers[0]
    for fused in (layer.self_attn.qkv, layer.mlp.gate_up, layer.mlp.down_proj, layer.self_attn.o_proj):
        assert isinstance(fused, Fp8Linear) and fused.activations and fused.input_scale is not None
        assert 0 < fused.input_scale.item() < 1e3
    again = build_engine(*overrides)  # the scales come from the cache: ModelOpt is not called again
    assert len(calls) == 1
    assert torch.equal(again.model.model.layers[0].mlp.down_proj.input_scale, layer.mlp.down_proj.input_scale)
    assert _continuation(engine).isfinite().all()


# ---- the GPU path against the reference (sm89+) ----
@gpu
@pytest.mark.parametrize("static", [False, True])
def test_quantize_rows_kernel_is_bit_identical(static):
    from kvexp.core.kernels.wq_matmul import quantize_rows

    gen = torch.Generator(device="cuda").manual_seed(3)
    for m, k in ((1, 2048), (8, 8960), (40, 1536)):
        x = (torch.randn(m, k, device="cuda", generator=gen) * 4).to(torch.bfloat16)
        x[0, :3] = torch.tensor([0.0, 1e-30, -1e-30])  # subnormal ratios
        scale = torch.tensor(0.004, device="cuda") if static else None
        q, s = quantize_rows(x, scale)
        qr, sr = quantize_rows_ref(x, scale)
        assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s, sr)


@gpu
@pytest.mark.parametrize("static", [False, True])
def test_gemv_rounds_activations_bit_for_bit_as_the_reference(static):
    """The W8A8 GEMV rounds x to e4m3 itself: through an identity weight its output is q * scale rounded once to
    bf16, which must equal the reference's q and scale exactly (a scale taken over the wrong rows, or a division
    that is not IEEE, changes some of them)."""
    from kvexp.core.kernels.wq_matmul import wq_matmul

    gen = torch.Generator(device="cuda").manual_seed(5)
    k = 512
    eye = torch.eye(k, device="cuda").to(E4M3)
    for m in (1, 5, 16):
        x = (torch.randn(m, k, device="cuda", generator=gen) * torch.logspace(-2, 2, m, device="cuda")[:, None])
        x = x.to(torch.bfloat16)
        x[0, :3] = torch.tensor([0.0, 1e-30, -1e-30])
        scale = torch.tensor(0.02, device="cuda") if static else None
        y = wq_matmul(x, eye, torch.ones(k, device="cuda"), 128, 8, row_scale=True,
                      x_quant="static" if static else "dynamic", x_scale=scale)
        q, s = quantize_rows_ref(x, scale)
        assert torch.equal(y, (q.float() * s[:, None]).to(torch.bfloat16)), m


@gpu
@pytest.mark.parametrize("activations", [False, True, "static"])
@pytest.mark.parametrize("kernel", ["triton", "scaled_mm"])
@pytest.mark.parametrize("rows", [1, 8, 16, 40])
def test_gpu_linear_matches_the_reference(activations, kernel, rows):
    gen = torch.Generator(device="cuda").manual_seed(4)
    dense = nn.Linear(2048, 3072, device="cuda")
    with torch.no_grad():
        dense.weight.normal_(0, 0.02, generator=gen)
    x = torch.randn(rows, 2048, device="cuda", generator=gen, dtype=torch.bfloat16)
    static = torch.tensor(3.0 / E4M3_MAX, device="cuda") if activations == "static" else None  # x beyond 3 saturates
    layer = Fp8Linear.from_linear(dense.to(torch.bfloat16), bool(activations), static)
    ref = layer._reference(x).float()
    layer.prepare(kernel)
    got = layer(x).float()
    # weight-only prefill runs cuBLAS over the weights dequantized to bf16 (one more rounding, 2^-9 per weight,
    # than the reference's float32): ~0.1% of the output's range over K=2048; a wrong scale or row is O(1)
    via_bf16 = not activations and (kernel == "scaled_mm" or rows > 16)
    atol = (2e-3 if via_bf16 else 4e-4) * ref.abs().max().item()
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=atol)
    gated = layer.silu_mul(x)
    if gated is not None:  # the [gate; up] epilogue of the GEMV
        g, u = ref.chunk(2, -1)
        torch.testing.assert_close(gated.float(), torch.nn.functional.silu(g) * u, rtol=3e-2, atol=1e-2)


@gpu
def test_gpu_engine_matches_the_cpu_reference():
    """bf16 on the GPU (its weights rounded to bf16 before e4m3), float32 on the CPU: close, not identical."""
    for quant in ("fp8_weights", "fp8"):
        cpu = _continuation(build_engine(f"quant={quant}", "quant.calib.dataset=builtin", "engine.device=cpu"))
        cuda = _continuation(build_engine(f"quant={quant}", "quant.calib.dataset=builtin", "engine.device=cuda",
                                          "model.dtype=bfloat16"))  # the kernels' dtype; tiny's own is float32
        assert (cpu.exp() * (cpu - cuda)).sum(-1).mean().item() < 2e-3, quant
