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
