"""kvexp's offline task suite: lm-eval task YAMLs and JSONL data generated at the run's context length.

    dirs = build_tasks(tokenizer, ["kvexp_passkey", ...], prompt_len=..., gen_len=..., seed=..., n=...,
                       cache_dir=...)
    TaskManager(include_path=[str(d) for d in dirs])   # registers those tasks

Long-context retrieval (RULER-style, generate_until, exact match): kvexp_passkey, kvexp_niah_multikey (needle
among distractors at several depths), kvexp_vt (variable tracking). Short, so loglikelihood paths run offline
too: kvexp_arith (multiple choice), kvexp_ppl (perplexity via loglikelihood_rolling). kvexp_recall is the
task of kvexp's model organism (kvexp/organism.py, model=organism): multi-query associative recall, exact match
of the asked record's value words in order. Each task gets its own
directory <cache_dir>/tasks/<task>-<key>, key = hash of (generator version, task, tokenizer fingerprint,
lengths, seed, n): written once through kvexp.artifacts (locked, atomic, checksummed) and reused; the same inputs
give byte-identical files.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kvexp import artifacts, organism
from kvexp.evaluate.tasks import generators
from kvexp.evaluate.tasks.generators import LONG_TASKS

GENERATOR_VERSION = 1  # bump when any generated document changes, so cached tasks are rebuilt
DEFAULT_SAMPLES = 50  # documents per task when eval.limit is null
FEWSHOT_POOL = 16  # training documents of kvexp_arith, for eval.num_fewshot
OFFLINE_TASKS = (*LONG_TASKS, "kvexp_recall", "kvexp_arith", "kvexp_ppl")
# Text whose encoding pins down how a tokenizer splits (normalizer, pre-tokenizer, merges, BOS/EOS added).
PROBE_TEXT = "The pass key is 71432. VAR QPBRX = VAR HJKLM.\nWhat is 7 plus 35? The grass is green."
SCORER = "!function kvexp.evaluate.tasks.scoring.process_results"
SCORER_ORDERED = "!function kvexp.evaluate.tasks.scoring.process_results_ordered"


def tokenizer_fingerprint(tokenizer) -> str:
    """Content hash of a tokenizer: the same vocabulary and splitting give the same hash wherever it is stored."""
    return artifacts.digest([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items()),
                             tokenizer.encode(PROBE_TEXT), tokenizer.bos_token, tokenizer.eos_token])


@dataclass(frozen=True)
class Recipe:
    """What a task's documents depend on (besides the task and GENERATOR_VERSION)."""
    tokenizer: Any
    prompt_len: int
    gen_len: int
    seed: int
    n: int

    @functools.cached_property
    def fingerprint(self) -> str:
        return tokenizer_fingerprint(self.tokenizer)

    def key(self, task: str) -> str:
        # kvexp_recall's documents come from kvexp.organism, whose vocabulary is part of its recipe
        organism_recipe = organism.VERSION_TAG if task == "kvexp_recall" else None
        return artifacts.digest({"version": GENERATOR_VERSION, "organism": organism_recipe, "task": task,
                                 "tokenizer": self.fingerprint, "prompt_len": self.prompt_len, "gen_len": self.gen_len,
                                 "seed": self.seed, "n": self.n})[:16]

    def budget(self, max_new: int) -> int:
        """Prompt tokens a generation task may use: prompt_len, less any of max_new that gen_len cannot hold."""
        return min(self.prompt_len, self.prompt_len + self.gen_len - max_new)

    def rng(self, task: str, i: int):
        return generators.sample_rng(task, self.seed, i, GENERATOR_VERSION)


def build_tasks(tokenizer, tasks: list[str], *, prompt_len: int, gen_len: int, seed: int, n: int,
                cache_dir: Path) -> list[Path]:
    """One directory per task (generated on first use), to pass as TaskManager include_path.

    Prompts are at most prompt_len tokens, and prompt + max_gen_toks at most prompt_len + gen_len, counted
    with `tokenizer` as the adapter encodes them (special tokens included). Only the tasks asked for are
    generated, so a task that cannot fit the context fails alone.
    """
    recipe = Recipe(tokenizer, prompt_len, gen_len, seed, n)
    dirs = [cache_dir / "tasks" / f"{task}-{recipe.key(task)}" for task in tasks]
    for task, target in zip(tasks, dirs):
        artifacts.cached(target, f"task {task}", functools.partial(_create, final=target, task=task, recipe=recipe),
                         lambda p: p)
    return dirs


def _create(tmp: Path, final: Path, task: str, recipe: Recipe) -> None:
    tmp.mkdir()
    WRITERS[task](tmp, final, task, recipe)


def _write_long(tmp: Path, final: Path, task: str, recipe: Recipe) -> None:
    """A retrieval task: each prompt filled with haystack up to the budget; the YAML names the final data path."""
    make, filler = LONG_TASKS[task]
    rngs = [recipe.rng(task, i) for i in range(recipe.n)]
    probes = [make(rng, i) for i, rng in enumerate(rngs)]
    max_new = generators.max_gen_toks(recipe.tokenizer, probes)
    budget = recipe.budget(max_new)
    docs, guess = [], budget // 12
    for probe, rng in zip(probes, rngs):
        docs.append(generators.fit_probe(recipe.tokenizer, task, probe, filler, rng, budget, guess))
        guess = docs[-1]["filler_sentences"]
    _write_jsonl(tmp / f"{task}.jsonl", docs)
    _write_yaml(tmp / f"{task}.yaml", _generation_config(task, final / f"{task}.jsonl", max_new), SCORER)


def _write_recall(tmp: Path, final: Path, task: str, recipe: Recipe) -> None:
    """Associative recall documents filling the budget; the answer is the asked value, then END."""
    answer = " " + " ".join(organism.VALUES[:organism.VALUE_LEN]) + " " + organism.END
    max_new = len(recipe.tokenizer.encode(answer, add_special_tokens=False)) + generators.ANSWER_MARGIN
    budget = recipe.budget(max_new)
    docs, guess = [], budget
    for i in range(recipe.n):
        docs.append(generators.recall(recipe.tokenizer, functools.partial(recipe.rng, task, i), i, budget, guess))
        guess = docs[-1]["words"]
    _write_jsonl(tmp / f"{task}.jsonl", docs)
    # END is ".", one of the generation tasks' stop strings
    _write_yaml(tmp / f"{task}.yaml", _generation_config(task, final / f"{task}.jsonl", max_new), SCORER_ORDERED)


def _write_arith(tmp: Path, final: Path, task: str, recipe: Recipe) -> None:
    _write_jsonl(tmp / f"{task}.jsonl", [generators.arithmetic(recipe.rng(task, i)) for i in range(recipe.n)])
    _write_jsonl(tmp / f"{task}.train.jsonl",
                 [generators.arithmetic(recipe.rng(f"{task}.train", i)) for i in range(FEWSHOT_POOL)])
    _write_yaml(tmp / f"{task}.yaml", _arith_config(final))


def _write_ppl(tmp: Path, final: Path, task: str, recipe: Recipe) -> None:
    _write_jsonl(tmp / f"{task}.jsonl", [generators.prose(recipe.tokenizer, recipe.rng(task, i), recipe.prompt_len)
                                         for i in range(recipe.n)])
    _write_yaml(tmp / f"{task}.yaml", _ppl_config(final / f"{task}.jsonl"))


WRITERS = {**{task: _write_long for task in LONG_TASKS}, "kvexp_recall": _write_recall, "kvexp_arith": _write_arith,
           "kvexp_ppl": _write_ppl}


def _write_jsonl(path: Path, docs: list[dict]) -> None:
    path.write_text("".join(json.dumps(d, sort_keys=True, ensure_ascii=False) + "\n" for d in docs))


class _Dumper(yaml.SafeDumper):
    """Writes strings holding a newline double-quoted ("\\n"), which reads better than YAML's folded form."""


_Dumper.add_representer(str, lambda dumper, s: dumper.represent_scalar(
    "tag:yaml.org,2002:str", s, style='"' if "\n" in s else None))


def _write_yaml(path: Path, config: dict, scorer: str | None = None) -> None:
    body = yaml.dump(config, Dumper=_Dumper, sort_keys=False, allow_unicode=True)
    # `!function` is lm-eval's YAML tag for a callable; safe_dump cannot emit custom tags, so it is appended.
    path.write_text(body + (f"process_results: {scorer}\n" if scorer else ""))


def _data(files: dict[str, Path]) -> dict:
    return {"dataset_path": "json", "dataset_kwargs": {"data_files": {k: str(v) for k, v in files.items()}}}


def _generation_config(task: str, data: Path, max_new: int) -> dict:
    return {
        "task": task, **_data({"validation": data}), "validation_split": "validation",
        "output_type": "generate_until", "doc_to_text": "input", "doc_to_target": "target",
        # Answers are digits or names: a newline or full stop ends them.
        "generation_kwargs": {"until": ["\n", "."], "max_gen_toks": max_new, "do_sample": False, "temperature": 0.0},
        "num_fewshot": 0,  # a few-shot haystack would not fit the context; lm-eval keeps a YAML 0 over the CLI's
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": GENERATOR_VERSION},
    }


def _arith_config(final: Path) -> dict:
    return {
        "task": "kvexp_arith",
        **_data({"train": final / "kvexp_arith.train.jsonl", "validation": final / "kvexp_arith.jsonl"}),
        "training_split": "train", "validation_split": "validation", "fewshot_split": "train",
        "output_type": "multiple_choice", "doc_to_text": "question", "doc_to_choice": "choices",
        "doc_to_target": "label",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
        "metadata": {"version": GENERATOR_VERSION},
    }


def _ppl_config(data: Path) -> dict:
    return {
        "task": "kvexp_ppl", **_data({"validation": data}), "validation_split": "validation",
        "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "text", "num_fewshot": 0,
        "metric_list": [{"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                        {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                        {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False}],
        "metadata": {"version": GENERATOR_VERSION},
    }
