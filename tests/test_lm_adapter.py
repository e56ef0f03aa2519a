"""KvexpLM against direct transformers computations on the same tiny fp32 model, and the offline suite
through lm-eval end to end.

The references follow lm-eval's conventions (as its HFLM does: that class needs `accelerate`, which kvexp
does not depend on), so the adapter must change nothing but who computes.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from lm_eval.api.instance import Instance

from kvexp.checkpoint import train_tokenizer
from kvexp.config import ContextConfig, EvalConfig
from kvexp.core.engine import BuildInfo, Engine, Generations, MemoryReport
from kvexp.errors import ConfigError
from kvexp.evaluate.accuracy import TaskFailed, check_tasks, evaluate_accuracy, flatten_metrics
from kvexp.evaluate.lm_adapter import KvexpLM
from kvexp.evaluate.tasks import OFFLINE_TASKS

MAX_SEQ_LEN = 48


class HFEngine(Engine):
    """A kvexp Engine over a transformers model: one-pass scoring, greedy decoding with no early stop."""
    name = "hf-test"

    def __init__(self, model, tokenizer, max_seq_len: int = MAX_SEQ_LEN):  # no RunSpec: a test double
        self.model, self._tokenizer, self._max_seq_len = model, tokenizer, max_seq_len
        self.calls: list[tuple[str, int, bool | None]] = []  # (method, batch size, kv_faithful)

    def build(self) -> BuildInfo:
        return BuildInfo(build_s=0.0)

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def max_seq_len(self) -> int:
        return self._max_seq_len

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens):
        self.calls.append(("generate", len(prompts), None))
        for prompt in prompts:
            assert len(prompt) + max_new_tokens <= self.max_seq_len, "adapter sent an over-long prompt"
        out = [hf_greedy(self.model, list(prompt), max_new_tokens) for prompt in prompts]
        return Generations(tokens=out, prefill_s=0.0, decode_s=0.0, decode_steps=max_new_tokens - 1)

    @torch.no_grad()
    def continuation_logprobs(self, requests, *, kv_faithful):
        self.calls.append(("score", len(requests), kv_faithful))
        out = []
        for ctx, cont in requests:
            assert ctx and len(ctx) + len(cont) <= self.max_seq_len, "adapter sent an over-long request"
            logits = self.model(torch.tensor([list(ctx) + list(cont)[:-1]])).logits[0, len(ctx) - 1:]
            out.append(torch.log_softmax(logits.float(), -1))
        return out

    def memory(self) -> MemoryReport:
        return MemoryReport(weight_bytes=0, kv_bytes_per_token=0.0, kv_bytes_per_token_formula=0.0, peak_bytes=0)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(512)


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config).float().eval()


def hf_loglikelihood(model, tokenizer, context: str, continuation: str,
                     max_len: int = MAX_SEQ_LEN) -> tuple[float, bool]:
    """Direct transformers computation with lm-eval's conventions: an empty context is BOS; a context's
    trailing spaces belong to the continuation; the whole text is encoded, then split; left-truncation."""
    if context:
        spaces = len(context) - len(context.rstrip())
        context, continuation = context[:len(context) - spaces], context[len(context) - spaces:] + continuation
        ctx = tokenizer.encode(context)
        cont = tokenizer.encode(context + continuation)[len(ctx):]
    else:
        ctx, cont = [tokenizer.bos_token_id], tokenizer.encode(continuation)
    ids = (ctx + cont)[-max_len:]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0, -len(cont):], -1)
    target = torch.tensor(cont)
    return logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


def hf_rolling(model, tokenizer, text: str) -> float:
    """Sum of log p(token | up to MAX_SEQ_LEN - 1 previous tokens, BOS first), one forward per token window."""
    ids = [tokenizer.bos_token_id] + tokenizer.encode(text)
    total, start = 0.0, 1
    while start < len(ids):
        end = min(start + MAX_SEQ_LEN - 1, len(ids))
        lo = max(0, end - MAX_SEQ_LEN)  # the full-length window ending at `end`, as lm-eval's last window
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[lo:end - 1]])).logits[0], -1)
        for pos in range(start, end):
            total += logp[pos - 1 - lo, ids[pos]].item()
        start = end
    return total


def instances(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, doc={}, arguments=a, idx=0) for a in args]


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """n argmax tokens, each from a full forward pass (no cache, no stopping: the engine contract)."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


def greedy_text(model, tokenizer, prompt: str, n: int) -> str:
    """Greedy continuation text, ended by EOS as a stopping generate() would end it."""
    tokens = hf_greedy(model, tokenizer.encode(prompt), n)
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[:tokens.index(tokenizer.eos_token_id)]
    return tokenizer.decode(tokens, skip_special_tokens=True)


def test_loglikelihood_matches_hf(model, tokenizer):
    long_ctx = "The river rose slowly through the night and the fields were under water. " * 4
    # A greedy continuation whose text re-encodes to the same token (BPE may merge it with the context).
    greedy = next((p, g) for p in ("A compiler turns", "The sky is", "In the spring", "Farmers moved")
                  if hf_loglikelihood(model, tokenizer, p, g := greedy_text(model, tokenizer, p, 1))[1])
    args = [("The sky is", " blue"), ("", "Hello there"), ("Numbers: ", "1 2 3 4"), (long_ctx, " again"),
            greedy, ("x", " y z")]
    engine = HFEngine(model, tokenizer)
    lm = KvexpLM(engine, batch_size=4, kv_faithful=True)
    got = lm.loglikelihood(instances("loglikelihood", args))
    for (lp, greedy_flag), (ref_lp, ref_greedy) in zip(got, [hf_loglikelihood(model, tokenizer, *a) for a in args]):
        assert lp == pytest.approx(ref_lp, abs=1e-4)
        assert greedy_flag == ref_greedy
    assert got[4][1] is True and not all(g for _, g in got)
    assert [c[1] for c in engine.calls] == [4, 2] and all(c[2] is True for c in engine.calls)


def test_loglikelihood_rolling_matches_hf(model, tokenizer):
    docs = [("Short text.",), ("The orchestra played in the old hall while the rain kept falling outside. " * 6,)]
    assert len(tokenizer.encode(docs[1][0])) > 2 * MAX_SEQ_LEN  # several windows
    lm = KvexpLM(HFEngine(model, tokenizer), batch_size=3, kv_faithful=False)
    got = lm.loglikelihood_rolling(instances("loglikelihood_rolling", docs))
    assert got == pytest.approx([hf_rolling(model, tokenizer, text) for text, in docs], abs=1e-4)


def test_generate_until_matches_hf(model, tokenizer):
    raw = greedy_text(model, tokenizer, "The sky is", 8)
    stop = raw[len(raw) // 2:len(raw) // 2 + 2]  # a stop string the greedy output is known to contain
    args = [("The sky is", {"until": [stop], "max_gen_toks": 8, "do_sample": False}),
            ("A long way", {"until": ["\n"], "max_gen_toks": 5}),
            ("The sky is", {"until": [], "max_gen_toks": 8})]
    engine = HFEngine(model, tokenizer)
    lm = KvexpLM(engine, batch_size=2, kv_faithful=False)
    got = lm.generate_until(instances("generate_until", args))
    assert got == [raw.split(stop)[0], greedy_text(model, tokenizer, "A long way", 5).split("\n")[0], raw]
    assert sorted(c[1] for c in engine.calls) == [1, 2]  # grouped by max_gen_toks, batched within a group


def test_generation_stops_at_eos_and_truncates_long_prompts(model, tokenizer):
    lm = KvexpLM(HFEngine(model, tokenizer), batch_size=2, kv_faithful=False)
    ids = tokenizer.encode("one two three")
    assert lm._cut(ids + [tokenizer.eos_token_id] + ids, until=[]) == "one two three"
    long_prompt = "word " * 200  # longer than max_seq_len: the engine asserts it receives a fitting prompt
    assert len(lm.generate_until(instances("generate_until", [(long_prompt, {"until": [], "max_gen_toks": 4})]))) == 1
    with pytest.raises(ValueError, match="max_gen_toks=48"):
        lm.generate_until(instances("generate_until", [("hi", {"until": [], "max_gen_toks": MAX_SEQ_LEN})]))


def test_flatten_metrics_names_and_skips():
    results = {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "word_perplexity_stderr,none": "N/A",
                     "exact_match,strict-match": 1.0}}
    assert flatten_metrics(results) == {"acc.t.acc": 0.5, "acc.t.acc_stderr": 0.1,
                                        "acc.t.exact_match.strict-match": 1.0}


def test_check_tasks_offline_names_need_no_lm_eval_index(monkeypatch):
    import kvexp.evaluate.accuracy as accuracy

    monkeypatch.setattr(accuracy, "lm_eval_task_names", lambda: pytest.fail("indexed lm-eval for offline tasks"))
    check_tasks(EvalConfig(tasks=list(OFFLINE_TASKS)))


def test_check_tasks_unknown_name_lists_close_matches():
    check_tasks(EvalConfig(tasks=["hellaswag", "kvexp_passkey"]))  # both known: no error
    with pytest.raises(ConfigError) as err:
        check_tasks(EvalConfig(tasks=["hellaswg", "kvexp_paskey"]))
    message = str(err.value)
    assert "\n" not in message and "hellaswag" in message and "kvexp_passkey" in message


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and a fresh datasets cache: the offline suite must not need either."""
    import datasets

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")
    return tmp_path


def run_spec(tmp_path, tasks: list[str], limit: int = 2):
    cfg = SimpleNamespace(eval=EvalConfig(tasks=tasks, limit=limit, batch_size=4, num_fewshot=1),
                          context=ContextConfig(prompt_len=256, gen_len=40), cache_dir=str(tmp_path / "cache"))
    return SimpleNamespace(cfg=cfg, kv_faithful=False, cache_dir=tmp_path / "cache")


def test_offline_suite_end_to_end_through_lm_eval(model, tokenizer, offline):
    engine = HFEngine(model, tokenizer, max_seq_len=296)
    metrics = evaluate_accuracy(engine, run_spec(offline, list(OFFLINE_TASKS)), offline / "out")
    for task in ("kvexp_passkey", "kvexp_niah_multikey", "kvexp_vt"):
        assert 0.0 <= metrics[f"acc.{task}.exact_match"] <= 1.0 and f"acc.{task}.exact_match_stderr" in metrics
    assert {"acc.kvexp_arith.acc", "acc.kvexp_arith.acc_norm_stderr", "acc.kvexp_ppl.word_perplexity"} <= set(metrics)
    assert "acc.kvexp_ppl.word_perplexity_stderr" not in metrics  # lm-eval reports it as N/A
    records = [json.loads(line) for line in (offline / "out" / "samples_kvexp_passkey.jsonl").read_text().splitlines()]
    assert len(records) == 2 and records[0]["target"] in records[0]["prompt"]
    assert {"prompt", "target", "output", "score"} <= set(records[0])
    results = json.loads((offline / "out" / "lm_eval_results.json").read_text())
    assert set(OFFLINE_TASKS) <= set(results["results"]) and results["config"]["kv_faithful"] is False
    assert {c[0] for c in engine.calls} == {"score", "generate"}


def test_failing_task_names_itself(model, tokenizer, offline):
    class Broken(HFEngine):
        def generate(self, prompts, max_new_tokens):
            raise RuntimeError("decode kernel exploded")

    with pytest.raises(TaskFailed, match="kvexp_passkey.*decode kernel exploded"):
        evaluate_accuracy(Broken(model, tokenizer, max_seq_len=296), run_spec(offline, ["kvexp_passkey"]),
                          offline / "out")


@pytest.fixture(scope="module")
def checkpoint(model, tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-hf")
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def torch_engine(checkpoint, *overrides: str):
    from conftest import make_spec
    from kvexp.engines.torch_engine import TorchEngine

    engine = TorchEngine(make_spec(f"model.path={checkpoint}", "engine.device=cpu", *overrides))
    engine.build()
    return engine


LL_ARGS = [("The sky is", " blue"), ("", "Hello there"), ("Numbers: ", "1 2 3 4"), ("x", " y z"),
           ("The river rose slowly through the night and the fields", " were under water by morning")]


def test_torch_engine_through_adapter_matches_hf(model, tokenizer, checkpoint):
    engine = torch_engine(checkpoint)
    reference = [hf_loglikelihood(model, tokenizer, *a, max_len=engine.max_seq_len) for a in LL_ARGS]
    for kv_faithful in (False, True):  # fp32 weights and KV cache: both scoring modes are exact
        got = KvexpLM(engine, batch_size=3, kv_faithful=kv_faithful).loglikelihood(instances("loglikelihood", LL_ARGS))
        assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in reference], abs=1e-4)
        assert [g for _, g in got] == [g for _, g in reference]
    lm = KvexpLM(engine, batch_size=2, kv_faithful=False)
    prompts = ["The sky is", "A compiler turns source code into", "In the spring"]
    got = lm.generate_until(instances("generate_until", [(p, {"until": [], "max_gen_toks": 6}) for p in prompts]))
    assert got == [greedy_text(model, tokenizer, p, 6) for p in prompts]


def test_int8_kv_shows_only_in_kv_faithful_scores(model, tokenizer, checkpoint):
    engine = torch_engine(checkpoint, "quant=int8kv")
    requests = instances("loglikelihood", LL_ARGS)
    one_pass = [lp for lp, _ in KvexpLM(engine, batch_size=3, kv_faithful=False).loglikelihood(requests)]
    faithful = [lp for lp, _ in KvexpLM(engine, batch_size=3, kv_faithful=True).loglikelihood(requests)]
    reference = [hf_loglikelihood(model, tokenizer, *a, max_len=engine.max_seq_len)[0] for a in LL_ARGS]
    assert one_pass == pytest.approx(reference, abs=1e-4)  # one prefill pass never reads the int8 cache
    # Continuations of 2+ tokens read K/V back from the cache: there the int8 rounding shows.
    multi = [i for i, (_, cont) in enumerate(LL_ARGS) if len(tokenizer.encode(cont)) > 1]
    assert max(abs(faithful[i] - one_pass[i]) for i in multi) > 1e-4
