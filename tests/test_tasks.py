"""The offline long-context suite: deterministic files, prompts that fit the context, needles where they should be."""
from __future__ import annotations

import json
import random
import re

import pytest
import yaml

from kvexp.artifacts import MANIFEST
from kvexp.checkpoint import train_tokenizer
from kvexp.errors import ConfigError
from kvexp.evaluate.tasks import OFFLINE_TASKS, build_tasks, scoring, text
from kvexp.evaluate.tasks.generators import DEPTHS

PROMPT_LEN, GEN_LEN, N = 320, 40, 5


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(512)


def build(tokenizer, cache_dir, tasks=OFFLINE_TASKS, **kw) -> dict:
    args = dict(prompt_len=PROMPT_LEN, gen_len=GEN_LEN, seed=7, n=N) | kw
    return dict(zip(tasks, build_tasks(tokenizer, list(tasks), cache_dir=cache_dir, **args)))


@pytest.fixture(scope="module")
def suite(tokenizer, tmp_path_factory):
    return build(tokenizer, tmp_path_factory.mktemp("cache"))


def docs(suite, task: str) -> list[dict]:
    return [json.loads(line) for line in (suite[task] / f"{task}.jsonl").read_text().splitlines()]


def task_config(suite, task: str) -> dict:
    # lm-eval's `!function` tag is not plain YAML; read it as a string to inspect the config.
    loader = type("Loader", (yaml.SafeLoader,), {})
    loader.add_constructor("!function", lambda ld, node: ld.construct_scalar(node))
    return yaml.load((suite[task] / f"{task}.yaml").read_text(), Loader=loader)


def test_same_seed_same_bytes_other_seed_other_files(tokenizer, suite, tmp_path):
    again = build(tokenizer, tmp_path)
    for task, first in suite.items():
        assert again[task].name == first.name and again[task] != first
        for path in (p for p in first.iterdir() if p.name != MANIFEST):  # the manifest holds digests of the YAMLs
            want = path.read_bytes().replace(str(first).encode(), str(again[task]).encode())  # YAMLs: absolute paths
            assert (again[task] / path.name).read_bytes() == want
    other = build(tokenizer, tmp_path, seed=8)
    for task in OFFLINE_TASKS:
        assert other[task].name != suite[task].name and docs(other, task) != docs(suite, task)


def test_sample_i_does_not_depend_on_n(tokenizer, suite, tmp_path):
    fewer = build(tokenizer, tmp_path, n=2)
    for task in OFFLINE_TASKS:
        assert docs(fewer, task) == docs(suite, task)[:2]


@pytest.mark.parametrize("task", ["kvexp_passkey", "kvexp_niah_multikey", "kvexp_vt"])
def test_long_prompts_fill_the_context_and_leave_room_for_the_answer(tokenizer, suite, task):
    max_new = task_config(suite, task)["generation_kwargs"]["max_gen_toks"]
    longest_answer = max(len(tokenizer.encode(" " + d["target"], add_special_tokens=False)) for d in docs(suite, task))
    assert max_new > longest_answer
    budget = min(PROMPT_LEN, PROMPT_LEN + GEN_LEN - max_new)
    filler_tokens = max(len(tokenizer.encode(s)) for s in text.NOISE + tuple(text.sentences(random.Random(0), 20)))
    for d in docs(suite, task):
        assert d["prompt_tokens"] == len(tokenizer.encode(d["input"])) <= budget
        assert d["prompt_tokens"] > budget - 2 * filler_tokens  # full, but for less than one filler sentence
        assert d["filler_sentences"] > 0


def test_passkey_needle_sits_at_its_depth(suite):
    found = []
    for d in docs(suite, "kvexp_passkey"):
        assert d["input"].count(d["target"]) == 2  # "The pass key is K. Remember it. K is the pass key."
        found.append(d["depth"])
        body = d["input"].split("\n")[1]  # instructions / haystack / question
        needle = f"The pass key is {d['target']}. Remember it. {d['target']} is the pass key."
        where = body.index(needle) / (len(body) - len(needle))  # 0 at the very start, 1 at the very end
        assert where == pytest.approx(d["depth"], abs=0.1)
    assert sorted(found) == sorted(DEPTHS)  # every depth probed


def test_niah_asks_one_key_among_distractors(suite):
    for d in docs(suite, "kvexp_niah_multikey"):
        needles = dict(re.findall(r"The special magic number for (\S+) is (\d+)\.", d["input"]))
        asked = re.search(r"What is the special magic number for (\S+)\?", d["input"]).group(1)
        assert len(needles) == 4 and needles[asked] == d["target"]


def test_vt_chain_is_in_order_and_is_the_answer(suite):
    for d in docs(suite, "kvexp_vt"):
        chain = d["answers"]
        value = d["input"].rsplit("assigned the value ", 1)[1].split("?")[0]
        positions = [d["input"].index(f"VAR {chain[0]} = {value}.")]
        positions += [d["input"].index(f"VAR {b} = VAR {a}.") for a, b in zip(chain, chain[1:])]
        assert positions == sorted(positions)


def test_exact_match_scoring():
    one, many = {"answers": ["71432"]}, {"answers": ["ABCDE", "FGHIJ"]}
    assert scoring.process_results(one, [" 71432"]) == {"exact_match": 1.0}
    assert scoring.process_results(one, [" 71433"]) == {"exact_match": 0.0}
    assert scoring.process_results(one, [" 71432 71432"]) == {"exact_match": 0.0}
    assert scoring.process_results(many, [" VAR FGHIJ and VAR ABCDE"]) == {"exact_match": 1.0}
    assert scoring.process_results(many, [" ABCDE"]) == {"exact_match": 0.0}


def test_a_task_too_long_for_the_context_fails_alone(tokenizer, tmp_path):
    # With this tokenizer, 160 tokens hold a passkey prompt but not four needles (the niah prompt needs ~190).
    build(tokenizer, tmp_path, tasks=["kvexp_passkey"], prompt_len=160, n=1)
    with pytest.raises(ConfigError, match=r"eval task kvexp_niah_multikey: .*context.prompt_len"):
        build(tokenizer, tmp_path, tasks=["kvexp_niah_multikey"], prompt_len=160, n=1)
    made = [p.name.split("-")[0] for p in (tmp_path / "tasks").glob("*/")]
    assert made == ["kvexp_passkey"]  # nothing half-written is left to be reused


def test_task_manager_registers_the_suite(suite):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(d) for d in suite.values()], include_defaults=False)
    assert set(OFFLINE_TASKS) <= set(manager.all_tasks)


@pytest.mark.parametrize("truth", [0, 1, 7, 100])
@pytest.mark.parametrize("guess", [0, 3, 50, 400])
def test_largest_fitting(truth, guess):
    calls = []

    def fits(k):
        calls.append(k)
        return k <= truth

    assert text.largest_fitting(fits, guess) == truth
    assert len(calls) < 40
    assert text.largest_fitting(lambda k: False, guess) == -1


def test_insert_at_depths_keeps_order_at_equal_depths():
    filler = ["a.", "b.", "c.", "d."]
    assert text.insert_at_depths(filler, [(0.5, "X."), (0.5, "Y."), (0.0, "S."), (1.0, "E.")]) == \
        "S. a. b. X. Y. c. d. E."
