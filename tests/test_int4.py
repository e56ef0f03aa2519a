"""INT4 weights: packing, the linear layer, and AWQ (through ModelOpt) beating round-to-nearest."""
import torch
from torch import nn

from conftest import build_engine
from kvexp.core.int4 import Int4Linear, pack, rtn_quantize, unpack
from kvexp.quant import weights
from kvexp.quant.weights import export_int4


def test_pack_round_trip():
    q = torch.randint(-8, 8, (16, 256), dtype=torch.int8)
    assert torch.equal(unpack(pack(q)), q)


def test_int4_linear_matches_float64_dequantized_reference():
    torch.manual_seed(0)
    w, x = torch.randn(48, 256), torch.randn(5, 256)
    qweight, scales = rtn_quantize(w, 64)
    pre, bias = torch.rand(256) + 0.5, torch.randn(48)
    layer = Int4Linear(qweight, scales, 64, pre, bias)
    q = unpack(qweight).double().reshape(48, 4, 64)
    w_deq = (q * scales.double()[..., None]).reshape(48, 256)
    ref = (x.double() * pre.double()) @ w_deq.T + bias.double()
    assert torch.allclose(layer(x).double(), ref, atol=1e-4)
    # and RTN itself is a faithful int4 grid: error at most half a step per weight
    step = scales.repeat_interleave(64, dim=1)
    assert ((w_deq - w.double()).abs() <= step.double() / 2 + 1e-6).all()


def _outlier_inputs(n, k, gen):
    x = torch.randn(n, k, generator=gen)
    x[:, :4] *= 40.0  # a few input channels with planted activation outliers (the case AWQ exists for)
    return x


def test_awq_beats_round_to_nearest_on_activation_outliers():
    import modelopt.torch.quantization as mtq

    gen = torch.Generator().manual_seed(0)
    k, n_out, group = 256, 64, 128
    ref_layer = nn.Linear(k, n_out, bias=False)
    with torch.no_grad():
        ref_layer.weight.copy_(torch.randn(n_out, k, generator=gen) * 0.05)
    w = ref_layer.weight.detach().clone()
    model = nn.Sequential(nn.Linear(k, n_out, bias=False))
    model[0].weight.data.copy_(w)
    calib = _outlier_inputs(256, k, gen)
    mtq.quantize(model, mtq.INT4_AWQ_CFG, lambda m: m(calib))
    state = export_int4(model, group)
    awq = Int4Linear(state["0.qweight"], state["0.scales"], group, state.get("0.pre_scale"))
    rtn = Int4Linear(*rtn_quantize(w, group), group)
    x = _outlier_inputs(512, k, gen)  # fresh inputs from the same distribution
    ref = x.double() @ w.double().T
    err = {name: ((layer(x).double() - ref).norm() / ref.norm()).item() for name, layer in
           (("awq", awq), ("rtn", rtn))}
    assert "0.pre_scale" in state
    assert err["awq"] < 0.8 * err["rtn"], err


def _count_calibrations(monkeypatch) -> list[str]:
    """Spy on the two int4 recipes: the names of the ones called, in order (the real work still runs)."""
    calls = []
    for name in ("_awq", "_rtn"):
        real = getattr(weights, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)
        monkeypatch.setattr(weights, name, spy)
    return calls


def test_awq_engine_uses_packed_weights_and_caches_them(tmp_path, monkeypatch):
    monkeypatch.setenv("KVEXP_CACHE_DIR", str(tmp_path))  # an empty cache: the first build must calibrate
    calls = _count_calibrations(monkeypatch)
    first = build_engine("quant=awq")
    assert calls == ["_awq"]  # the spy sees the calibration (were it moved, this fails rather than pass blind)
    swapped = [m for m in first.model.modules() if isinstance(m, Int4Linear)]
    # q|k|v, o, gate|up, down in each of the 2 layers, fused: AWQ's input scales are shared where inputs are; the
    # lm_head stays dense
    assert len(swapped) == 2 * 4
    assert all(m.qweight.dtype == torch.uint8 for m in swapped)
    second = build_engine("quant=awq")  # same quant hash: the calibrated weights come from the cache
    assert calls == ["_awq"], calls  # no second calibration: equal tensors alone would pass a bypassed cache
    qw = lambda e: [m.qweight for m in e.model.modules() if isinstance(m, Int4Linear)]
    assert all(torch.equal(a, b) for a, b in zip(qw(first), qw(second)))
    dense = build_engine("quant=fp16")
    assert first.memory().weight_bytes < 0.7 * dense.memory().weight_bytes


def test_awq_shares_one_input_scale_where_linears_share_an_input():
    """q|k|v and gate|up get one pre_quant_scale each (ModelOpt's own re-smoothing for fused QKV), so kvexp fuses
    them; the re-smoothed model stays about as close to the float model as ModelOpt's per-linear scales left it."""
    import copy

    import modelopt.torch.quantization as mtq
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    reference = copy.deepcopy(model)
    calib = torch.randint(0, 256, (8, 64))
    test = torch.randint(0, 256, (4, 64))
    with torch.no_grad():
        mtq.quantize(model, mtq.INT4_AWQ_CFG, lambda m: m(calib))
        want = reference(test).logits.double()

        def error() -> float:
            return ((model(test).logits.double() - want).norm() / want.norm()).item()

        per_linear = error()
        scales = lambda: [[m.input_quantizer.pre_quant_scale for m in g] for layer in model.model.layers for g in
                          ((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                           (layer.mlp.gate_proj, layer.mlp.up_proj))]
        assert any(not torch.equal(g[0], g[1]) for g in scales())  # AWQ's search did give each linear its own
        weights.share_input_scales(model)
        assert all(torch.equal(g[0], m) for g in scales() for m in g)
        shared = error()
    assert 0 < shared < 1.25 * per_linear + 1e-3, (shared, per_linear)
    state = export_int4(model, 128)
    q, k = (state[f"model.layers.0.self_attn.{n}_proj.pre_scale"] for n in "qk")
    assert torch.equal(q, k)  # what kvexp's fuse_projections needs to merge them


def test_awq_input_scales_fold_into_the_norms_and_up_rows():
    """fold_input_scales moves q|k|v's and gate|up's shared input scale into the RMSNorm before them and down's
    into up's output rows: the same logits (float32 rounding), no scale multiply left but o's, and the shared
    projections still fuse."""
    from kvexp.core.model import ArchConfig, CausalLM

    torch.manual_seed(0)
    arch = ArchConfig.from_hf(dict(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    model = CausalLM(arch).float().eval()
    for layer in model.model.layers:
        layer.input_layernorm.weight.data.uniform_(0.5, 1.5)
        layer.post_attention_layernorm.weight.data.uniform_(0.5, 1.5)
        attn, mlp = layer.self_attn, layer.mlp
        for parent, names in ((attn, ("q_proj", "k_proj", "v_proj")), (mlp, ("gate_proj", "up_proj")),
                              (mlp, ("down_proj",)), (attn, ("o_proj",))):
            s = torch.rand(getattr(parent, names[0]).in_features) * 3 + 0.25  # one scale per shared input
            for name in names:
                old = getattr(parent, name)
                setattr(parent, name, Int4Linear(*rtn_quantize(old.weight.detach(), 32, 4), 32, s.clone(),
                                                 None if old.bias is None else old.bias.detach()))
    tokens = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        before = model.logits(model(tokens, torch.zeros(2, dtype=torch.long)))
        assert model.fold_input_scales() == 2 * (3 + 2 + 1)
        after = model.logits(model(tokens, torch.zeros(2, dtype=torch.long)))
    left = [n for n, m in model.named_modules() if isinstance(m, Int4Linear) and m.pre_scale is not None]
    assert left == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    assert ((after - before).norm() / before.norm()).item() < 1e-5
    model.fuse_projections()
    assert all(layer.self_attn.qkv is not None and layer.mlp.gate_up is not None for layer in model.model.layers)
