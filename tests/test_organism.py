"""The model organism: its documents, its tokenizer, deterministic training, and the accuracy it shows through
lm-eval and the engine under fp16, int8 KV, coarse int4 KV and AWQ (issue 8)."""
from __future__ import annotations

import hashlib
import json
import random
from collections import Counter

import pytest

from conftest import compose
from test_sweep import kvexp_run, runs_in

from kvexp import organism
from kvexp.errors import ConfigError
from kvexp.evaluate.tasks import build_tasks, scoring
from kvexp.tracking import TAG


def test_recall_document_holds_its_records_and_asks_them_back():
    for i in range(50):
        rng = random.Random(i)
        pairs = rng.randint(1, organism.max_pairs(200))
        doc = organism.recall_doc(rng, 200, pairs, rng.randint(1, pairs))
        w = doc.words
        assert len(w) == 200 and w.count(organism.ASK) == 1
        ask = w.index(organism.ASK)
        records = {w[j]: w[j + 1:j + 1 + organism.VALUE_LEN] for j in range(ask) if w[j] in organism.KEYS}
        assert len(records) == pairs
        values = [v for value in records.values() for v in value]
        assert len(set(values)) == len(values), "a value word repeated: copying the next word would be ambiguous"
        # after ASK: records again, each the same key and value as stored, and the targets are their value words + END
        asked = w[ask + 1:]
        assert len(asked) % organism.RECORD == 0
        for j in range(0, len(asked), organism.RECORD):
            key, value = asked[j], asked[j + 1:j + 1 + organism.VALUE_LEN]
            assert records[key] == value and asked[j + organism.RECORD - 1] == organism.END
        expected = [k for k in range(ask + 1, len(w)) if w[k] not in organism.KEYS]
        assert doc.targets == expected


@pytest.mark.parametrize("i", range(8))
def test_eval_prompt_ends_on_a_stored_key_and_the_answer_is_its_value(i):
    prompt, answer = organism.eval_doc(random.Random(f"t{i}"), 120, i)
    assert len(prompt) + len(answer) + 1 == 120 and prompt[-1] in organism.KEYS
    stored = prompt.index(prompt[-1])
    assert stored < prompt.index(organism.ASK) and prompt[stored + 1:stored + 1 + organism.VALUE_LEN] == answer
    if i % 4 == 0:  # the passkey documents: one record in filler, asked once
        assert sum(word in organism.KEYS for word in prompt) == 2


def test_tokenizer_spends_one_token_per_word_and_round_trips():
    tok = organism.build_tokenizer()
    words = organism.documents(1, 64, seed="tok")[0].split()
    ids = tok.encode(" ".join(words), add_special_tokens=False)
    assert len(ids) == len(words) and tok.unk_token_id not in ids
    assert tok.decode(ids).split() == words
    assert tok.encode("zebra", add_special_tokens=False) == [tok.unk_token_id]


def test_documents_are_deterministic_and_long_enough():
    a, b = organism.documents(3, 100, seed="x"), organism.documents(3, 100, seed="x")
    assert a == b and a != organism.documents(3, 100, seed="y")
    assert [len(d.split()) for d in a] == [100] * 3


def tiny_recipe(**train) -> dict:
    t = dict(organism.TRAIN, phases=((24, 6),), aux_steps=3, warmup=2) | train
    return dict(organism.RECIPE, train=t)


def test_training_is_deterministic(tmp_path):
    """Two trainings of one recipe give the same bytes, and report on the recipe they were given."""
    digests = []
    for name in ("a", "b"):
        out = tmp_path / name
        out.mkdir()
        report = organism.train(out, tiny_recipe())
        digests.append(hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
        assert report["train_len"] == 24 and report["recipe_hash"] == organism.recipe_hash(tiny_recipe())
        assert organism.is_organism(str(out))
    assert digests[0] == digests[1]


def test_a_new_recipe_is_a_new_model_and_new_runs(monkeypatch):
    """The recipe's hash names the cached checkpoint, and through the BuildSpec's model fingerprint the run hash and
    the caches derived from the model: a rebuilt organism is never skipped as done or fed the old one's AWQ."""
    from kvexp.checkpoint import BUILTINS
    from kvexp.quant.weights import artifact_key
    from kvexp.resolve import validate

    assert organism.recipe_hash(tiny_recipe()) != organism.recipe_hash(tiny_recipe(seed=1))
    assert BUILTINS["organism"]["version"] == organism.VERSION_TAG == f"{organism.VERSION}-{organism.recipe_hash()}"
    before = validate(compose("experiment=organism", "quant=awq"))
    monkeypatch.setitem(BUILTINS, "organism", dict(BUILTINS["organism"], version="2-other"))
    after = validate(compose("experiment=organism", "quant=awq"))
    assert after.build.model_fingerprint == "builtin:organism@v2-other" != before.build.model_fingerprint
    assert after.config_hash != before.config_hash
    assert artifact_key(after, "weights", "calib") != artifact_key(before, "weights", "calib")


def test_recall_task_fills_the_context_with_the_organisms_tokenizer(tmp_path):
    tok = organism.build_tokenizer()
    [task_dir] = build_tasks(tok, ["kvexp_recall"], prompt_len=256, gen_len=16, seed=0, n=12, cache_dir=tmp_path)
    docs = [json.loads(line) for line in (task_dir / "kvexp_recall.jsonl").read_text().splitlines()]
    assert len(docs) == 12
    for d in docs:
        prompt = d["input"].split()
        assert d["prompt_tokens"] == len(tok.encode(d["input"])) == 256 == len(prompt)
        stored = prompt.index(prompt[-1])
        assert d["target"].split() == prompt[stored + 1:stored + 1 + organism.VALUE_LEN]
    assert Counter(d["records"] == 1 for d in docs)[True] == 3  # every fourth is a passkey document


def test_recall_task_fits_any_tokenizer(tmp_path):
    """The words are plain text: a byte-level BPE (a real model's kind) encodes them in more tokens, still fitted."""
    from kvexp.checkpoint import train_tokenizer

    tok = train_tokenizer(512)
    [task_dir] = build_tasks(tok, ["kvexp_recall"], prompt_len=300, gen_len=40, seed=0, n=4, cache_dir=tmp_path)
    docs = [json.loads(line) for line in (task_dir / "kvexp_recall.jsonl").read_text().splitlines()]
    assert all(270 <= d["prompt_tokens"] <= 300 and d["words"] < 300 for d in docs)


def test_recall_is_scored_in_order():
    doc = {"target": "17 04 88"}
    assert scoring.process_results_ordered(doc, [" 17 04 88 "])["exact_match"] == 1.0
    assert scoring.process_results_ordered(doc, ["17 04 88."])["exact_match"] == 1.0
    assert scoring.process_results_ordered(doc, ["04 17 88"])["exact_match"] == 0.0
    assert scoring.process_results_ordered(doc, ["17 04"])["exact_match"] == 0.0


def test_calibration_reads_the_organisms_documents():
    from kvexp.config import CalibConfig
    from kvexp.quant.calib import calibration_batches

    tok = organism.build_tokenizer()
    batches = calibration_batches(tok, CalibConfig(dataset="organism", num_samples=4, seq_len=64))
    assert len(batches) == 4 and batches[0].shape == (1, 64)
    assert tok.unk_token_id not in set(int(t) for b in batches for t in b.flatten())


@pytest.mark.parametrize("overrides, field", [
    (["model=organism", "quant=awq"], "quant.calib.dataset=cnn_dailymail"),
    (["model=organism", "quant=int8kv_static", "quant.calib.dataset=builtin"], "quant.calib.dataset=builtin"),
    (["model=organism", "eval=quick"], "eval.tasks: kvexp_passkey"),
    (["model.path={copy}", "eval=quick"], "eval.tasks: kvexp_passkey"),  # a copy of its directory, by path
])
def test_organism_refuses_text_it_cannot_read(overrides, field, tmp_path):
    from kvexp.resolve import validate

    (tmp_path / organism.REPORT).write_text("{}")
    with pytest.raises(ConfigError) as e:
        validate(compose(*(o.format(copy=tmp_path) for o in overrides)))
    assert str(e.value).startswith(field) and "organism" in str(e.value)


def test_experiment_organism_declares_its_sweep_and_the_command_line_wins():
    from kvexp import preflight

    plan = preflight.plan(["-m", "experiment=organism"])
    quants = ["fp16", "int8kv", "int4kv_static", "awq"]
    assert [(s.cfg.quant.name, s.cfg.context.prompt_len) for s in plan.specs] == [
        (q, n) for q in quants for n in (256, 384)]
    assert all(s.cfg.model.path == organism.MODEL_PATH and s.cfg.eval.tasks == ["kvexp_recall"] for s in plan.specs)
    assert len({s.config_hash for s in plan.specs}) == 8
    narrowed = preflight.plan(["-m", "experiment=organism", "quant=fp16,awq", "context.prompt_len=256"])
    assert [s.cfg.quant.name for s in narrowed.specs] == ["fp16", "awq"]
    assert len(preflight.plan(["experiment=organism"]).specs) == 1  # without -m, one run: no sweep
    # hydra.* overrides shape the declared sweep before Hydra reads it, so preflight reads it with them
    assert len(preflight.plan(["-m", "experiment=organism", "hydra.sweeper.params.quant=fp16"]).specs) == 2
    with pytest.raises(ConfigError, match="^model=orgnism: unknown option"):  # named before any composing
        preflight.plan(["-m", "experiment=organism", "model=orgnism"])


# ---- the trained organism (trained once per test session, ~80 s on a 2-core CPU) ----------------------------
QUANTS = ("fp16", "int8kv", "int4kv", "int4kv_static", "awq")


@pytest.fixture(scope="module")
def recall(tmp_path_factory) -> dict[str, tuple[float, float]]:
    """quant -> (exact match, stderr) of kvexp_recall at the training length, through lm-eval and the engine."""
    from kvexp.resolve import validate
    from kvexp.engines import engine_class
    from kvexp.evaluate.accuracy import evaluate_accuracy

    out = {}
    for quant in QUANTS:
        spec = validate(compose("experiment=organism", f"quant={quant}"))
        engine = engine_class(spec.engine_options.name)(spec)
        engine.build()
        metrics = evaluate_accuracy(engine, spec, tmp_path_factory.mktemp(quant))
        engine.close()
        out[quant] = (metrics["acc.kvexp_recall.exact_match"], metrics["acc.kvexp_recall.exact_match_stderr"])
    print("\nkvexp_recall at 256 tokens:", {q: f"{a:.3f} ± {s:.3f}" for q, (a, s) in out.items()})
    return out


@pytest.mark.slow
def test_trained_organism_recalls_in_its_training_range(recall):
    from kvexp.checkpoint import _builtin
    from kvexp.config import resolve_cache_dir

    report = json.loads((_builtin("organism", resolve_cache_dir(None)) / organism.REPORT).read_text())
    assert report["recall_at_train_len"] >= 0.9 and report["recipe_hash"] == organism.recipe_hash()
    acc, stderr = recall["fp16"]
    assert acc >= 0.9 and 0 < stderr < 0.03


@pytest.mark.slow
def test_int8_kv_stays_within_a_couple_of_points(recall):
    assert abs(recall["int8kv"][0] - recall["fp16"][0]) <= 0.02


@pytest.mark.slow
def test_coarse_int4_kv_loses_clearly_more_and_awq_lands_in_between(recall):
    # Bounds that held for training seeds 0-3 (docs/benchmarks.md): another CPU's arithmetic trains other weights.
    # The shipped model on our CPUs: fp16 0.995, int8kv 0.990, int4kv 0.970, awq 0.980, int4kv_static 0.890.
    fp16, int8, coarse, awq = (recall[q][0] for q in ("fp16", "int8kv", "int4kv_static", "awq"))
    assert coarse <= fp16 - 0.015 and coarse <= int8 - 0.015  # the per-tensor int4 scale costs points (2 to 10)
    assert coarse < awq <= fp16 + 0.01  # weights at 4 bits: no gain, and less loss than the coarse KV cache
    assert recall["int4kv"][0] >= coarse  # a scale per token and head loses less than one per tensor


@pytest.mark.slow
def test_experiment_organism_sweeps_through_hydra_and_tracks_recall(in_tmp, recall):
    """The demo's wiring end to end (narrowed to three runs): Hydra launches what preflight planned, each run logs
    recall with its stderr, and the sweep's table shows it. `recall` has trained the organism into the cache."""
    proc = kvexp_run(in_tmp, "-m", "experiment=organism", "quant=fp16,int8kv,int4kv_static",
                     "context.prompt_len=256", "eval.limit=40")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 finished, 0 failed, 0 skipped" in proc.stdout and "kvexp_recall.exact_match" in proc.stdout
    children = {r.data.tags[TAG + "quant"]: r for r in runs_in(in_tmp) if r.data.tags.get(TAG + "sweep") != "true"}
    assert sorted(children) == ["fp16", "int4kv_static", "int8kv"]
    for r in children.values():
        assert r.data.params["model.path"] == organism.MODEL_PATH and r.data.params["context.prompt_len"] == "256"
        assert 0 <= r.data.metrics["acc.kvexp_recall.exact_match_stderr"] < 0.1  # 0 when all 40 are right
        assert r.data.metrics["acc.kvexp_recall.exact_match"] >= 0.5
    # fidelity on the organism's own documents: the coarse cache distorts the next-token distribution far more
    kl = {q: r.data.metrics["fid.kl_mean"] for q, r in children.items()}
    assert kl["fp16"] == 0 and 0 < 30 * kl["int8kv"] < kl["int4kv_static"], kl
