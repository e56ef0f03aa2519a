"""engine=hf (Hugging Face transformers' own generate) as a peer of engine=torch: the same numbers from the same
weights, its KV quantization through transformers' QuantizedCache, its refusals, and the sweep with both."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from conftest import build_engine, make_spec
from kvexp.engines.hf import HfOptions
from kvexp.engines.hf import kv as hf_kv
from kvexp.errors import KvexpError, MissingDependency
from kvexp.tracking import TAG

ROOT = Path(__file__).resolve().parents[1]
needs_hqq = pytest.mark.skipif(hf_kv.find_spec("hqq") is None, reason="needs hqq (pip install 'kvexp[hf]')")
# fp32 on the CPU, the same weights, the same math in another order: log-probs agree to rounding. A real bug (a
# position off by one, the wrong cache entry read) moves them by O(1) nats.
LOGPROB_ATOL = 1e-4


def requests(seed: int) -> list[tuple[list[int], list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = ((20, 5), (30, 12), (7, 1), (12, 9))  # engine=torch's extend pads continuations to the longest:
    return [(torch.randint(3, 500, (n,), generator=gen).tolist(), torch.randint(3, 500, (m,), generator=gen).tolist())
            for n, m in shapes]  # kept within max(ctx + cont) so it has room for that padding


@pytest.fixture(scope="module")
def engines():
    return build_engine("engine=torch"), build_engine("engine=hf")


def test_options_mirror_yaml():
    cfg = yaml.safe_load((ROOT / "conf" / "engine" / "hf.yaml").read_text())
    assert set(cfg) == {f.name for f in dataclasses.fields(HfOptions)}
    HfOptions(**cfg)  # the shipped defaults are valid


@pytest.mark.parametrize("kv_faithful", [False, True])
def test_scores_equal_engine_torch(engines, kv_faithful):
    torch_engine, hf = engines
    reqs = requests(0)
    for (_, cont), a, b in zip(reqs, *(e.continuation_logprobs(reqs, kv_faithful=kv_faithful) for e in engines)):
        assert b.shape == (len(cont), hf.tokenizer.vocab_size) and b.dtype == torch.float32
        assert torch.allclose(b.exp().sum(-1), torch.ones(len(cont)), atol=1e-4)  # log-softmax rows
        assert (a - b).abs().max().item() < LOGPROB_ATOL


def test_greedy_tokens_equal_engine_torch_with_mixed_lengths(engines):
    """Left padding (transformers) and right padding (kvexp) must give every prompt its own continuation."""
    prompts = [ctx for ctx, _ in requests(1)]
    a, b = (e.generate(prompts, 12) for e in engines)
    assert b.tokens == a.tokens and all(len(t) == 12 for t in b.tokens)
    assert b.decode_steps == 11 and b.prefill_s > 0 and b.decode_s > 0


def test_memory_report_matches_engine_torch(engines):
    a, b = (e.memory() for e in engines)
    assert b.weight_bytes == a.weight_bytes  # the same tensors, stored the same way (fp32 on the CPU)
    assert b.kv_bytes_per_token == b.kv_bytes_per_token_formula == a.kv_bytes_per_token


def test_cpu_runs_eager_and_says_so():
    engine = build_engine("engine=hf")
    info = engine.build()
    assert info.metrics["hf.compiled"] == 0 and not engine.compiled


@needs_hqq
@pytest.mark.parametrize("backend, dtype", [("hqq", "int8"), ("hqq", "int4"), ("quanto", "int4")])
def test_quantized_cache_has_one_scale_per_token_and_head(backend, dtype):
    """Tokens whose magnitudes span 1e5: only per-(token, head) scales keep each within a step of the format.
    Mean error a quarter step (uniform rounding), which a qmax off by 2x (half a step) fails; HQQ's zero-point
    optimisation may move single elements up to ~2 steps."""
    if backend == "quanto" and hf_kv.find_spec("optimum") is None:
        pytest.skip("needs optimum-quanto")
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=1, hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
    cache = hf_kv.quantized_cache(config, dtype, backend, residual_length=1, head_dim=32)
    gen = torch.Generator().manual_seed(7)
    k = torch.randn(2, 2, 40, 32, generator=gen) * torch.logspace(-3, 2, 40)[None, None, :, None]
    cache.update(k, -k, 0)
    back, _ = cache.update(torch.zeros(2, 2, 1, 32), torch.zeros(2, 2, 1, 32), 0)  # what the next step reads
    step = (k.amax(-1) - k.amin(-1)) / (2 ** hf_kv.BITS[dtype] - 1)
    err = (back[:, :, :40] - k).abs()
    assert (err.mean(-1) / step).mean().item() < 0.3
    assert (err.amax(-1) / step).max().item() < 2.0


@needs_hqq
def test_int8_kv_is_read_back_quantized_and_smaller(engines):
    """KV-faithful scores read the context back through the quantized cache: they move, a little; one-pass scores
    never read the cache and stay put (DESIGN.md)."""
    _, fp16 = engines
    int8 = build_engine("engine=hf", "quant=int8kv")
    reqs = requests(2)
    faithful = [(a - b).abs().max().item() for a, b in zip(int8.continuation_logprobs(reqs, kv_faithful=True),
                                                          fp16.continuation_logprobs(reqs, kv_faithful=True))]
    one_pass = [(a - b).abs().max().item() for a, b in zip(int8.continuation_logprobs(reqs, kv_faithful=False),
                                                          fp16.continuation_logprobs(reqs, kv_faithful=False))]
    assert 0 < max(faithful) < 0.1 and max(one_pass) == 0
    mem, ref = int8.memory(), fp16.memory()
    d = fp16.head_dim  # int8 values plus an fp32 scale and zero per (token, head), against fp32 values
    assert mem.kv_bytes_per_token == mem.kv_bytes_per_token_formula
    assert mem.kv_bytes_per_token / ref.kv_bytes_per_token == (d + 2 * 4) / (4 * d)
    assert len(int8.generate([c for c, _ in reqs], 4).tokens[0]) == 4


@pytest.mark.parametrize("overrides, words", [
    (("quant=awq",), ["quant.weights", "engine=hf", "engine=torch"]),
    (("quant=fp8kv",), ["quant.kv_cache.dtype=fp8", "engine=torch"]),
    (("quant=int8kv_static",), ["quant.kv_cache.scale=static", "engine=hf"]),
    (("quant=int8kv", "engine.kv_backend=quanto"), ["engine.kv_backend=quanto", "engine.kv_backend=hqq"]),
    (("bench.profile=torch",), ["bench.profile=torch", "engine=torch"]),
    (("engine.kv_backend=bnb",), ["engine.kv_backend=bnb", "hqq, quanto"]),
])
def test_what_it_cannot_run_is_refused_in_one_line(overrides, words):
    with pytest.raises(KvexpError) as e:
        make_spec("engine=hf", *overrides)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_a_missing_backend_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(hf_kv, "find_spec", lambda name: None)
    with pytest.raises(MissingDependency, match=r"pip install hqq"):
        make_spec("engine=hf", "quant=int8kv")
    with pytest.raises(MissingDependency, match=r"pip install optimum-quanto"):
        make_spec("engine=hf", "quant=int4kv", "engine.kv_backend=quanto")



def test_compare_shows_each_engine_against_its_own_fp16_and_against_hf():
    from kvexp.compare import Row, tables

    def row(engine, quant, tok_s, peak):
        return Row(run_id=engine + quant, name=engine + quant, model="m", quant=quant, context="short", prompt_len=8,
                   gen_len=4, engine=engine, config_hash=(engine + quant) * 8, sweep_id="s",
                   metrics={"perf.decode_tok_s": tok_s, "mem.peak_bytes": peak})

    rows = [row("hf", "fp16", 100.0, 4096.0), row("hf", "int8kv", 50.0, 2048.0),
            row("torch", "fp16", 300.0, 4096.0), row("torch", "int8kv", 330.0, 1024.0), row("torch", "awq", 400.0, 1.0)]
    tabs, _ = tables(rows, rows)
    main = next(t for t in tabs if t.title.startswith("fidelity"))
    col = main.headers.index("tok/s")
    by_run = {(c[0], c[3], c[1]): c[col] for c in main.cells}  # (model, engine, quant) -> cell
    assert by_run[("m", "hf", "int8kv")] == "50 (0.5x)" and by_run[("m", "torch", "int8kv")] == "330 (1.1x)"
    peer = next(t for t in tabs if "vs engine=hf" in t.title)
    assert [(c[1], c[3]) for c in peer.cells] == [("fp16", "torch"), ("int8kv", "torch")]  # awq: no hf row
    tok, mem = peer.headers.index("tok/s"), peer.headers.index("peak mem")
    assert [c[tok] for c in peer.cells] == ["300 (3x)", "330 (6.6x)"]
    assert peer.cells[1][mem] == "1 KiB (0.5x)"


def test_compare_has_no_hf_table_without_hf_rows():
    from kvexp.compare import Row, tables

    rows = [Row(run_id="a", name="a", model="m", quant="fp16", context="short", prompt_len=8, gen_len=4,
                engine="torch", config_hash="a" * 8, sweep_id="s", metrics={"perf.decode_tok_s": 1.0})]
    assert not any("vs engine=hf" in t.title for t in tables(rows, rows)[0])


def test_a_sweep_skips_the_cells_hf_cannot_run_and_a_single_run_is_refused(in_tmp):
    """transformers' AWQ loader needs gptqmodel and a pre-quantized checkpoint: in a sweep, hf's awq cell is skipped
    with one line naming the engines that run it, the other cells are planned; alone, it is refused (exit 2)."""
    from test_sweep import kvexp_run

    from kvexp import preflight

    plan = preflight.plan(["-m", "engine=torch,hf", "quant=fp16,awq", "experiment=smoke"])
    assert [(s.engine_options.name, s.cfg.quant.name) for s in plan.specs] == [("torch", "fp16"), ("torch", "awq"),
                                                                                ("hf", "fp16")]
    assert plan.refused == ["kvexp: skip engine=hf quant=awq: quant.weights (dtype=int4, algo=awq): not supported by "
                            "engine=hf; supported by engine=torch|trtllm"]
    with pytest.raises(KvexpError, match="quant.weights"):  # a sweep of nothing but refusals runs nothing
        preflight.plan(["-m", "engine=hf", "quant=awq,fp8", "experiment=smoke"])
    with pytest.raises(KvexpError, match="not one of"):  # a typo is not a capability: the whole sweep is refused
        preflight.plan(["-m", "engine=torch,hf", "quant.kv_cache.dtype=int9", "experiment=smoke"])
    proc = kvexp_run(in_tmp, "engine=hf", "quant=awq", "experiment=smoke")
    assert proc.returncode == 2 and not (in_tmp / "mlruns" / "mlflow.db").exists()
    assert proc.stderr.strip() == ("kvexp: error: quant.weights (dtype=int4, algo=awq): not supported by engine=hf; "
                                   "supported by engine=torch|trtllm")


@pytest.mark.slow
@needs_hqq
def test_sweep_runs_both_engines_and_compares_them(in_tmp):
    """The issue's command, engine=torch,hf x fp16,int8kv,awq on the tiny model (about 100 s on 2 cores): hf's awq
    cell skipped in one line, five FINISHED runs, each engine's int8kv against its own fp16, and the table of torch
    against hf per preset."""
    from test_sweep import METRICS, kvexp_run, runs_in

    proc = kvexp_run(in_tmp, "-m", "engine=torch,hf", "quant=fp16,int8kv,awq", "experiment=smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "5 finished, 0 failed" in proc.stdout and "vs engine=hf with the same model, quant and context" in proc.stdout
    assert proc.stdout.count("kvexp: skip engine=hf quant=awq: ") == 1
    jobs = {(r.data.tags[TAG + "engine"], r.data.tags[TAG + "quant"]): r for r in runs_in(in_tmp)
            if r.data.tags.get(TAG + "sweep") != "true"}
    assert set(jobs) == {(e, q) for e in ("torch", "hf") for q in ("fp16", "int8kv")} | {("torch", "awq")}
    for (engine, quant), r in jobs.items():
        assert set(METRICS) <= set(r.data.metrics), (engine, quant, set(METRICS) - set(r.data.metrics))
        assert any(k.startswith("acc.kvexp_ppl.") for k in r.data.metrics)
    hf = jobs["hf", "fp16"].data
    assert hf.metrics["hf.compiled"] == 0 and hf.params["engine.kv_backend"] == "hqq"  # a CPU row says eager
    assert hf.metrics["fid.greedy_agree"] == 1 and hf.metrics["fid.kl_mean"] == 0
    assert jobs["hf", "int8kv"].data.metrics["mem.kv_bytes_per_token"] < hf.metrics["mem.kv_bytes_per_token"]
    ppl = "acc.kvexp_ppl.byte_perplexity"  # the same weights: the fp16 rows of both engines score alike
    assert jobs["torch", "fp16"].data.metrics[ppl] == pytest.approx(hf.metrics[ppl], rel=1e-5)


@pytest.mark.slow
def test_organism_recall_and_greedy_tokens_agree_across_engines(tmp_path):
    """builtin:organism (trained once per session, ~80 s) at fp16 on both engines: the same weights, so lm-eval's
    recall agrees within its stderr, and greedy generation of the fidelity prompts is token for token the same."""
    from conftest import compose
    from kvexp.resolve import validate
    from kvexp.evaluate import fidelity
    from kvexp.evaluate.accuracy import evaluate_accuracy

    scores, observed = {}, {}
    for name in ("torch", "hf"):
        spec = validate(compose("experiment=organism", f"engine={name}", "quant=fp16"))
        engine = build_engine("experiment=organism", f"engine={name}", "quant=fp16")
        try:
            metrics = evaluate_accuracy(engine, spec, tmp_path / name)
            observed[name] = fidelity.observe(engine, spec)
        finally:
            engine.close()
        scores[name] = {k: v for k, v in metrics.items() if k.startswith("acc.kvexp_recall.")}
    recall = next(k for k in scores["torch"] if "_stderr" not in k)
    stderr = max(scores[n][recall.replace("exact_match", "exact_match_stderr")] for n in scores)
    assert scores["torch"][recall] > 0.5  # the organism recalls: agreement is not two zeros
    assert abs(scores["torch"][recall] - scores["hf"][recall]) <= stderr, scores
    agree = fidelity.compare(observed["torch"], observed["hf"])
    print(f"\norganism fp16, torch vs hf: {scores}; fidelity of hf against torch: {agree}")
    assert agree["fid.greedy_agree"] == 1.0 and agree["fid.top1_agree"] == 1.0 and agree["fid.kl_mean"] < 1e-6


def test_a_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch, caplog):
    """What the CUDA path does when torch.compile fails (simulated on the CPU): the same tokens, eager, logged."""
    engine = build_engine("engine=hf")
    prompts = [ctx for ctx, _ in requests(3)]
    eager = engine.generate(prompts, 5).tokens
    real = engine.model.generate

    def failing(*args, **kwargs):
        if "compile_config" in kwargs:
            raise RuntimeError("inductor: simulated failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.model, "generate", failing)
    engine.compiled = True
    assert engine._warm_compile() >= 0 and not engine.compiled  # at build: the run records hf.compile_failed=1
    engine.compiled = True
    with caplog.at_level("WARNING"):
        assert engine.generate(prompts, 5).tokens == eager and not engine.compiled
    assert "torch.compile failed (RuntimeError: inductor: simulated failure)" in caplog.text


def test_bench_rows_put_each_engine_against_hf():
    from kvexp.engines.hf.bench import engine_rows, with_ratios

    rows = with_ratios(engine_rows("builtin:tiny", [(16, 2)], gen=4, iters=1, device="cpu", dtype="float32"))
    assert [(r["engine"], r["quant"], r["ctx"], r["batch"]) for r in rows] == [("torch", "fp16", 16, 2),
                                                                              ("hf", "fp16", 16, 2)]
    torch_row, hf_row = rows
    assert hf_row["compiled"] == 0 and torch_row["compiled"] is None and "x_hf_tok_s" not in hf_row
    assert torch_row["x_hf_tok_s"] == torch_row["tok_s"] / hf_row["tok_s"] and hf_row["ttft_ms"] > 0
    # fidelity against engine=torch's fp16: zero for itself; hf reads the same fp32 weights, so its greedy tokens agree
    assert torch_row["fid_kl"] == 0 and torch_row["fid_greedy"] == 1
    assert hf_row["fid_kl"] < 1e-3 and hf_row["fid_greedy"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_compiled_hf_matches_engine_torch():
    """The GPU path as transformers documents it (static cache + torch.compile): it compiles, and in float32 (no
    bf16 rounding to tell two implementations apart) its greedy tokens equal engine=torch's on CUDA; in bf16 it
    compiles too and keeps the token count."""
    gpu = ("engine.device=cuda",)
    prompts = [ctx for ctx, _ in requests(4)]
    ref = build_engine("engine=torch", "engine.attention=torch", "model.dtype=float32", *gpu)  # no fp32 Triton kernel
    hf = build_engine("engine=hf", "model.dtype=float32", *gpu)
    assert hf.compiled, "torch.compile fell back to eager: see the warning in the log"
    for batch in (prompts[:1], prompts):  # batch 1, then mixed lengths (left padding)
        assert hf.generate(batch, 16).tokens == ref.generate(batch, 16).tokens
    bf16 = build_engine("engine=hf", "model.dtype=bfloat16", *gpu)
    assert bf16.compiled and all(len(t) == 16 for t in bf16.generate(prompts, 16).tokens)
    assert bf16.memory().peak_bytes > 0
