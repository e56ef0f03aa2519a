"""The native engine's CUDA paths: tinygemm int4, the Triton decode kernel inside the model, CUDA-graph decode."""
import pytest
import torch

from conftest import build_engine, save_checkpoint
from kvexp.core.int4 import Int4Linear, rtn_quantize

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPU = ("engine.device=cuda", "model.dtype=bfloat16")


def test_tinygemm_int4_matches_dequantized_reference():
    torch.manual_seed(0)
    w = torch.randn(1024, 2048)
    qweight, scales = rtn_quantize(w, 128)
    layer = Int4Linear(qweight.cuda(), scales.cuda().bfloat16(), 128, torch.rand(2048, device="cuda").bfloat16() + 0.5)
    x = torch.randn(3, 7, 2048, device="cuda", dtype=torch.bfloat16)
    ref = torch.nn.functional.linear((x * layer.pre_scale).float(), layer.dequantize().float())
    assert layer.prepare_tinygemm() and layer.qweight is None
    out = layer(x).float()
    assert out.shape == (3, 7, 1024)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("quant", ["fp16", "int8kv", "fp8kv", "int8kv_static"])
def test_triton_decode_step_matches_the_reference_path(quant):
    engine = build_engine(f"quant={quant}", *GPU)
    model = engine.model
    assert model.decode_attn is not None  # attention=auto picks the Triton kernel on CUDA
    gen = torch.Generator().manual_seed(0)
    lens = torch.tensor([50, 7, 33], device="cuda")
    prompts = [torch.randint(3, 500, (int(n),), generator=gen).tolist() for n in lens]
    tokens, _ = engine._padded(prompts)
    cache = engine.new_cache(3, 64)
    with torch.inference_mode():
        model(tokens, torch.zeros_like(lens), cache, "prefill")
        step = torch.randint(3, 500, (3, 1), device="cuda")
        fused = model(step, lens, cache, "extend")
        kernel, model.decode_attn = model.decode_attn, None
        reference = model(step, lens, cache, "extend")  # rewrites the same K/V, then reads the cache back
        model.decode_attn = kernel
    assert ((fused - reference).float().norm() / reference.float().norm()).item() < 2e-2


@pytest.mark.parametrize("quant", ["fp16", "int8kv", "awq"])
@pytest.mark.parametrize("batch", [1, 2])  # batch 1: size-1 dims, where compiled ops choose odd strides
def test_graph_decode_equals_eager_decode(quant, batch):
    prompts = [list(range(3, 40)), list(range(10, 20))][:batch]
    extra = ["quant.weights.algo=rtn"] if quant == "awq" else []  # same int4 format, no ModelOpt needed
    graphs = build_engine(f"quant={quant}", *extra, *GPU)
    eager = build_engine(f"quant={quant}", *extra, "engine.cuda_graphs=false", *GPU)
    a, b = graphs.generate(prompts, 16), eager.generate(prompts, 16)
    assert graphs._loop.graph is not None and eager._loop.graph is None
    assert a.tokens == b.tokens


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="programmatic dependent launch needs sm90+")
@pytest.mark.parametrize("quant", ["fp16", "int8kv", "awq", "fp8"])
def test_pdl_decode_equals_plain_launch(quant):
    """Every kernel of a PDL launch waits for the one before ahead of its first load (kernels.pdl): the graph with
    it generates, token for token, what the graph without it does."""
    from kvexp.core.kernels import pdl, pdl_switch

    prompts = [list(range(3, 40)), list(range(10, 20))]
    extra = {"awq": ["quant.weights.algo=rtn"], "fp8": ["quant.calib.dataset=builtin"]}.get(quant, [])
    with pdl_switch(False):
        plain = build_engine(f"quant={quant}", *extra, *GPU)
        a = plain.generate(prompts, 24)
    with pdl_switch(True):
        assert pdl(torch.empty(1, device="cuda"))
        chained = build_engine(f"quant={quant}", *extra, *GPU)
        b = chained.generate(prompts, 24)
    assert plain._loop.graph is not None and chained._loop.graph is not None
    assert a.tokens == b.tokens


def test_cuda_bf16_engine_matches_cpu_float32_engine(tmp_path):
    """The whole CUDA path (compiled fused ops, merged projections, bf16) against the fp32 CPU reference path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    save_checkpoint(LlamaForCausalLM, LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096), tmp_path)
    gen = torch.Generator().manual_seed(3)
    reqs = [(torch.randint(3, 500, (60,), generator=gen).tolist(), torch.randint(3, 500, (12,), generator=gen).tolist())
            for _ in range(3)]
    cuda = build_engine("quant=fp16", f"model.path={tmp_path}", *GPU)
    cpu = build_engine("quant=fp16", f"model.path={tmp_path}", "engine.device=cpu")
    assert cuda.model.model.layers[0].self_attn.qkv is not None and cuda.model.ops is not cpu.model.ops
    for faithful in (False, True):
        a = torch.cat(cuda.continuation_logprobs(reqs, kv_faithful=faithful))
        b = torch.cat(cpu.continuation_logprobs(reqs, kv_faithful=faithful))
        assert (b.max(-1).values - b.min(-1).values).min() > 5  # peaked: differences cannot hide
        kl = (b.exp() * (b - a)).sum(-1).mean().item()
        assert kl < 1e-2 and (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9  # a real bug gives KL > 0.1


def test_tinygemm_prefill_path_matches_decode_path():
    torch.manual_seed(1)
    qweight, scales = rtn_quantize(torch.randn(512, 1024), 128)
    layer = Int4Linear(qweight.cuda(), scales.cuda().bfloat16(), 128)
    assert layer.prepare_tinygemm()
    x = torch.randn(300, 1024, device="cuda", dtype=torch.bfloat16)  # > PREFILL_ROWS: the dense GEMM path
    rows = torch.cat([layer(x[i:i + 16]) for i in range(0, 300, 16)])  # <= PREFILL_ROWS: tinygemm
    dense = layer(x)
    assert ((dense.float() - rows.float()).norm() / rows.float().norm()).item() < 1e-2


def test_organism_recalls_through_the_triton_kernel(tmp_path):
    """builtin:organism (trained on the CPU, as always), then recall decoded on the GPU by the Triton kernel over
    its 16-dim heads, in bf16 and with int8 KV. Greedy generation scored by hand: lm-eval's own path is what
    test_organism checks on the CPU."""
    import random

    from kvexp import organism

    report = organism.train(tmp_path)
    assert report["recall_at_train_len"] >= 0.9
    docs = [organism.eval_doc(random.Random(f"gpu:{i}"), organism.TRAIN_LEN, i) for i in range(200)]
    scores = {}
    for quant in ("fp16", "int8kv"):
        engine = build_engine(f"quant={quant}", f"model.path={tmp_path}", "eval=organism", "context.prompt_len=256",
                              *GPU)
        assert engine.model.decode_attn is not None
        tok = engine.tokenizer
        gens = engine.generate([tok.encode(" ".join(prompt)) for prompt, _ in docs], organism.VALUE_LEN)
        scores[quant] = sum(tok.decode(list(t)).split() == answer for (_, answer), t in zip(docs, gens.tokens)) / 200
        engine.close()
    print(f"\norganism on {torch.cuda.get_device_name()}: trained (CPU) in {report['train_s']:.0f} s, "
          f"teacher-forced recall {report['recall_at_train_len']:.3f}; greedy recall at {organism.TRAIN_LEN}: {scores}")
    assert scores["fp16"] >= 0.9 and abs(scores["int8kv"] - scores["fp16"]) <= 0.03, scores


def test_int4_kernel_follows_the_batch_and_both_kernels_agree():
    """engine.int4_kernel=auto: tinygemm for a batch-1 job, the Triton W4A16 kernel for batch 8 (resolved at
    preflight, TorchEngine.resolve_options); every int4 layer runs what the BuildSpec says, and the two give the
    same logits to bf16 rounding."""
    extra = ("quant=awq", "quant.weights.algo=rtn", *GPU)
    engines = {b: build_engine(*extra, f"bench.batch_size={b}") for b in (1, 8)}
    logits = {}
    for batch, engine in engines.items():
        kernel = engine.spec.build.options["int4_kernel"]
        assert kernel == ("tinygemm" if batch == 1 else "triton")
        kernels = {m.kernel for m in engine.model.modules() if isinstance(m, Int4Linear)}
        assert kernels == {kernel}, kernels
        tokens = torch.arange(3, 40, device="cuda")[None]
        with torch.inference_mode():
            cache = engine.new_cache(1, 64)
            hidden = engine.model(tokens, torch.zeros(1, dtype=torch.long, device="cuda"), cache, "prefill")
            logits[batch] = engine.model.logits(hidden[:, -1]).float()
    assert ((logits[1] - logits[8]).norm() / logits[8].norm()).item() < 2e-2
