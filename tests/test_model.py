"""The native engine against Hugging Face transformers (fp32, CPU): same logits, same greedy tokens."""
import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from conftest import build_engine, save_checkpoint
from kvexp.core.model import rope_inv_freq


def _hf_logprobs(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


ARCHS = {
    "llama3-rope": (LlamaForCausalLM, LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}, rope_theta=500000.0)),
    "qwen2-bias": (Qwen2ForCausalLM, Qwen2Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=4096, tie_word_embeddings=False)),
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logprobs_and_greedy_match_transformers(arch, tmp_path):
    cls, config = ARCHS[arch]
    hf = save_checkpoint(cls, config, tmp_path)
    engine = build_engine(f"model.path={tmp_path}", "context.prompt_len=100", "context.gen_len=12")
    gen = torch.Generator().manual_seed(1)
    ctx = torch.randint(3, 512, (90,), generator=gen).tolist()
    cont = torch.randint(3, 512, (10,), generator=gen).tolist()
    ref = _hf_logprobs(hf, ctx + cont)[len(ctx) - 1: -1]
    for faithful in (False, True):  # an fp32 cache changes nothing
        ours = engine.continuation_logprobs([(ctx, cont)], kv_faithful=faithful)[0]
        assert torch.allclose(ours, ref, atol=1e-4), (faithful, (ours - ref).abs().max())
    # batched greedy generation, ragged prompts, equals HF greedy decoding of each prompt alone
    prompts = [ctx[:90], ctx[:37], ctx[:5]]
    out = engine.generate(prompts, 12)
    for prompt, tokens in zip(prompts, out.tokens):
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                               min_new_tokens=12)[0, len(prompt):].tolist()
        assert tokens == want
    assert out.decode_steps == 11 and out.prefill_s > 0 and out.decode_s > 0


def test_rope_parameters_layout_of_transformers5():
    old = {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    new = {"rope_parameters": dict(old["rope_scaling"], rope_theta=500000.0)}
    assert rope_inv_freq(old, 64) == rope_inv_freq(new, 64)
    default = rope_inv_freq({"rope_theta": 500000.0}, 64)
    scaled = rope_inv_freq(old, 64)
    assert scaled[0] == default[0] and scaled[-1] == pytest.approx(default[-1] / 32)


def test_builtin_tiny_is_deterministic(tmp_path, monkeypatch):
    from kvexp.checkpoint import BUILTINS, _make_tiny

    a, b = tmp_path / "a", tmp_path / "b"
    _make_tiny(a, BUILTINS["tiny"])
    _make_tiny(b, BUILTINS["tiny"])
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert json.loads((a / "tokenizer.json").read_text()) == json.loads((b / "tokenizer.json").read_text())
    text = "Quantization stores numbers with fewer bits; 12345 ünïcode!"
    t = AutoTokenizer.from_pretrained(a)  # loads with the stock Auto class
    assert t.decode(t.encode(text, add_special_tokens=False)) == text


def test_decode_step_through_the_triton_linears_matches_the_reference_path(monkeypatch):
    """Dense projections and the head as DenseLinear, int4 layers too, all on the Triton GEMV (with the
    fused silu * up epilogue) for a decode step, against the same model on the reference path; fp16, CPU
    through Triton's interpreter (what prepare_kernels picks on sm80+ GPUs)."""
    from test_kernels import _kernel_skip_reason

    if _kernel_skip_reason():
        pytest.skip(_kernel_skip_reason())
    from kvexp.core.int4 import DenseLinear, PackedLinear

    monkeypatch.setattr(PackedLinear, "prepare", lambda self, kernel="auto", **_: setattr(self, "kernel", "triton") or "triton")
    for quant in (["quant=fp16"], ["quant=awq", "quant.weights.algo=rtn"]):
        engine = build_engine(*quant, "model.dtype=float16", "engine.device=cpu")
        model = engine.model
        gen = torch.Generator().manual_seed(5)
        ctx = torch.randint(3, 500, (2, 20), generator=gen)
        step = torch.randint(3, 500, (2, 1), generator=gen)
        outs = []
        for kernels in ("reference", "triton"):
            if kernels == "triton":
                counts = model.prepare_kernels(dense="triton")
                gate_up = model.model.layers[0].mlp.gate_up
                assert isinstance(gate_up, DenseLinear if quant == ["quant=fp16"] else PackedLinear)
                # fp16: only gate|up is worth the Triton GEMV at this size (model._triton_wins); int4: all 4 x 2
                assert counts == ({"dense.triton": 2} if quant == ["quant=fp16"] else {"int4.triton": 8})
            cache = engine.new_cache(2, 32)
            with torch.inference_mode():
                model(ctx, torch.zeros(2, dtype=torch.long), cache, "prefill")
                outs.append(model.logits(model(step, torch.full((2,), 20), cache, "extend")[:, 0]))
        ref, out = outs
        assert not out.isnan().any()
        assert ((out - ref).norm() / ref.norm()).item() < 5e-3, quant  # fp16 roundings only


def test_kv_faithful_scoring_of_ragged_requests_fits_the_cache():
    """A long context with a short continuation beside a short context with a long one: every continuation is
    padded to the longest, so the cache must hold the longest context plus the longest continuation (it held the
    longest context + continuation, and the first request wrote past its end). Unquantized, KV-faithful scores
    equal one-pass scores."""
    from conftest import build_engine

    engine = build_engine("quant=fp16")
    reqs = [(list(range(3, 36)), [40]), (list(range(5, 12)), list(range(50, 59)))]
    faithful = engine.continuation_logprobs(reqs, kv_faithful=True)
    one_pass = engine.continuation_logprobs(reqs, kv_faithful=False)
    assert [t.shape[0] for t in faithful] == [1, 9]
    for a, b in zip(faithful, one_pass):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("quant", ["fp16", "int8kv", "int4kv"])
def test_decode_and_extend_through_the_fused_rope_write_match_the_torch_path(quant):
    """The Triton path's cache (fused_write) takes RoPE and the cache write from the q|k|v projection in one
    kernel (kv_write.rope_write); a decode step and a 3-token extend give the torch path's logits and cache bytes,
    bf16 on a CPU through Triton's interpreter, where the kernel rounds as torch does."""
    from test_kernels import _kernel_skip_reason

    if _kernel_skip_reason():
        pytest.skip(_kernel_skip_reason())
    from kvexp.core.kv import FORMATS, KVCache, QuantizedKVCache

    engine = build_engine(f"quant={quant}", "model.dtype=bfloat16", "engine.device=cpu")
    model, a = engine.model, engine.arch
    gen = torch.Generator().manual_seed(6)
    ctx = torch.randint(3, 500, (2, 12), generator=gen)
    steps = [torch.randint(3, 500, (2, n), generator=gen) for n in (1, 3)]
    outs, caches = [], []
    for fused in (False, True):
        args = (a.num_layers, 2, a.num_kv_heads, 24, a.head_dim, torch.bfloat16, "cpu")
        kv = engine.spec.cfg.quant.kv_cache.dtype
        cache = KVCache(*args, fused_write=fused) if kv == "auto" else \
            QuantizedKVCache(*args, fmt=FORMATS[kv], fused_write=fused)
        with torch.inference_mode():
            model(ctx, torch.tensor([0, 2]), cache, "prefill")
            pos, logits = torch.tensor([12, 14]), []
            for tokens in steps:
                logits.append(model.logits(model(tokens, pos, cache, "extend")))
                pos = pos + tokens.shape[1]
        outs.append(torch.cat(logits, 1))
        caches.append(cache)
    assert torch.equal(outs[0], outs[1])
    for want, got in zip(caches[0].tensors(), caches[1].tensors()):
        assert torch.equal(want.view(torch.uint8), got.view(torch.uint8))
