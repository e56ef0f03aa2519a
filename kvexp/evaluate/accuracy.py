"""Accuracy of one run: lm-eval tasks scored through the engine under test, as `acc.<task>.<metric>` metrics.

    check_tasks(spec.cfg.eval)                      # at validation, before anything is built
    metrics = evaluate_accuracy(engine, spec, out)  # after engine.build(); writes samples + results to out

Each configured task runs in its own lm_eval.simple_evaluate call, so a failure names its task.
"""
from __future__ import annotations

import difflib
import functools
import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from kvexp.errors import ConfigError
from kvexp.evaluate.tasks import DEFAULT_SAMPLES, OFFLINE_TASKS, build_tasks

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

    from kvexp.config import EvalConfig, RunSpec
    from kvexp.core.engine import Engine
    from kvexp.evaluate.lm_adapter import KvexpLM

log = logging.getLogger(__name__)


class TaskFailed(RuntimeError):
    """An lm-eval task failed mid-run; the message names the task and the cause."""


@functools.lru_cache(maxsize=1)
def _lm_eval_index() -> TaskManager:
    """lm-eval's index of the tasks it ships. Indexing its YAMLs takes seconds, so once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def lm_eval_task_names() -> frozenset[str]:
    """Every task, group and tag lm-eval ships."""
    return frozenset(_lm_eval_index().all_tasks)


def check_tasks(eval_cfg: EvalConfig) -> None:
    """Raise ConfigError, one line, for a task name neither kvexp's offline suite nor lm-eval knows."""
    for task in eval_cfg.tasks:
        if not isinstance(task, str):
            raise ConfigError(f"eval.tasks: {task!r} is not a task name (a string)")
    unknown = [t for t in eval_cfg.tasks if t not in OFFLINE_TASKS]
    if not unknown:
        return  # offline tasks only: no need to index lm-eval's thousands of YAMLs
    known = lm_eval_task_names()
    unknown = [t for t in unknown if t not in known]
    if unknown:
        pool = sorted(known | set(OFFLINE_TASKS))
        hints = [f"{t} (close: {', '.join(difflib.get_close_matches(t, pool, n=3)) or 'none'})" for t in unknown]
        raise ConfigError(f"eval.tasks: unknown task {'; '.join(hints)}; kvexp's offline tasks are "
                          f"{', '.join(OFFLINE_TASKS)}; lm-eval's: `lm-eval ls tasks`")


def check_runnable(spec: RunSpec) -> None:
    """Preflight, before anything is built: the Hub datasets of the lm-eval tasks can be reached, and kvexp's
    generated tasks fit the context with the model's tokenizer (generated now, where the tokenizer can be read
    without a download; the accuracy stage then reuses them)."""
    ev = spec.cfg.eval
    for task in ev.tasks:
        if task not in OFFLINE_TASKS:
            for dataset in hub_datasets(task):
                _check_dataset(task, dataset)
    offline = [t for t in ev.tasks if t in OFFLINE_TASKS]
    if offline and (tokenizer := _local_tokenizer(spec)) is not None:
        generate_tasks(tokenizer, spec, offline)


def generate_tasks(tokenizer, spec: RunSpec, tasks: list[str]) -> list[Path]:
    """kvexp's offline tasks for this run's context, eval.limits documents each (kvexp.evaluate.tasks)."""
    ev, ctx = spec.cfg.eval, spec.cfg.context
    return [d for task in tasks for d in build_tasks(tokenizer, [task], prompt_len=ctx.prompt_len,
                                                     gen_len=ctx.gen_len, seed=ev.seed,
                                                     n=task_limit(ev, task) or DEFAULT_SAMPLES,
                                                     cache_dir=spec.cache_dir)]


def task_limit(ev: EvalConfig, task: str) -> int | None:
    """Documents of `task` to score: eval.limits[task], else eval.limit (None: all)."""
    return ev.limits.get(task, ev.limit)


def hub_datasets(task: str) -> list[str]:
    """The Hugging Face Hub datasets an lm-eval task, group or tag reads (local files and builders aside)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    index = _lm_eval_index().task_index
    entry = index.get(task)
    if entry is None:
        return []
    if entry.kind.name == "TAG":
        return sorted({d for name, e in index.items() if task in e.tags for d in hub_datasets(name)})
    cfg = entry.cfg or (load_yaml(entry.yaml_path, resolve_func=False) if entry.yaml_path else {})
    if entry.kind.name == "GROUP":
        members = cfg.get("task") or []
        return sorted({d for m in members if isinstance(m, str) for d in hub_datasets(m)})
    path = cfg.get("dataset_path")
    return [path] if isinstance(path, str) and path.count("/") == 1 and not Path(path).exists() else []


@functools.lru_cache(maxsize=None)
def _check_dataset(task: str, dataset: str) -> None:
    """A Hub dataset that cannot be reached is bad input: one line, naming what runs offline."""
    from kvexp.checkpoint import OFFLINE_HINT, unreachable

    if any(os.environ.get(v, "0").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        if not _dataset_cached(dataset):
            raise ConfigError(f"eval.tasks: {task} reads {dataset} from the Hugging Face Hub, not in the local cache "
                              f"and HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set ({OFFLINE_HINT})")
        return
    from huggingface_hub import HfApi

    try:
        HfApi().dataset_info(dataset, timeout=15)
    except Exception as e:  # the Hub client raises many types; only those that mean "unreachable" are caught
        if not unreachable(e):
            raise
        raise ConfigError(f"eval.tasks: {task} reads {dataset} from the Hugging Face Hub, which could not be reached "
                          f"({type(e).__name__}); check the network ({OFFLINE_HINT})") from e


def _dataset_cached(dataset: str) -> bool:
    """Whether the datasets library or the Hub cache holds `dataset` (what an offline load_dataset reads)."""
    from datasets import config as ds_config
    from huggingface_hub.constants import HF_HUB_CACHE

    return (Path(ds_config.HF_DATASETS_CACHE) / dataset.replace("/", "___")).is_dir() or \
        (Path(HF_HUB_CACHE) / ("datasets--" + dataset.replace("/", "--"))).is_dir()


def _local_tokenizer(spec: RunSpec):
    """The model's tokenizer where reading it downloads and builds nothing: a local checkpoint's, or builtin:tiny's
    (trained in a second from the shipped corpus, as when the builtin is made); None for a Hub model (checked once
    downloaded) and for the organism (its task is made for its vocabulary)."""
    from transformers import AutoTokenizer

    from kvexp import organism
    from kvexp.checkpoint import BUILTIN_PREFIX, BUILTINS, train_tokenizer

    path = spec.cfg.model.path
    if organism.is_organism(path):
        return None
    if path.startswith(BUILTIN_PREFIX):
        return train_tokenizer(BUILTINS[path[len(BUILTIN_PREFIX):]]["vocab_size"])
    if spec.build.model_dir is not None:
        return AutoTokenizer.from_pretrained(spec.build.model_dir)
    return None


def evaluate_accuracy(engine: Engine, spec: RunSpec, out_dir: Path) -> dict[str, float]:
    """Run spec.cfg.eval.tasks through `engine` (built) and return {acc.<task>.<metric>[_stderr]: value}.

    Writes out_dir/samples_<task>.jsonl (prompt, target, output, score per document) and
    out_dir/lm_eval_results.json (lm-eval's results, updated after each task, so a failure keeps the rest).
    """
    from kvexp.evaluate.lm_adapter import KvexpLM

    ev = spec.cfg.eval
    if not ev.tasks:
        return {}
    out_dir.mkdir(parents=True, exist_ok=True)
    manager = _task_manager(engine, spec)
    lm = KvexpLM(engine, batch_size=ev.batch_size, kv_faithful=spec.kv_faithful)
    merged: dict = {}
    metrics: dict[str, float] = {}
    for task in ev.tasks:
        results = _run_task(lm, task, manager, ev)
        for name, samples in results.pop("samples", {}).items():
            _write_samples(out_dir / f"samples_{name}.jsonl", samples)
        _merge(merged, results)
        _write_json(out_dir / "lm_eval_results.json", merged)
        metrics.update(flatten_metrics(results["results"]))
    return metrics


def _task_manager(engine: Engine, spec: RunSpec) -> TaskManager:
    """lm-eval's task index plus kvexp's offline suite, generated for this run's context and tokenizer."""
    import datasets
    from lm_eval.tasks import TaskManager

    datasets.disable_progress_bars()  # "Generating validation split" per task: the engine's own bars say more

    ev, ctx = spec.cfg.eval, spec.cfg.context
    offline = [t for t in ev.tasks if t in OFFLINE_TASKS]
    dirs = generate_tasks(engine.tokenizer, spec, offline)
    # lm-eval's RULER tasks size their documents from this metadata (FACTS.md).
    metadata = {"max_seq_lengths": [ctx.prompt_len], "tokenizer": engine.tokenizer.name_or_path}
    return TaskManager(include_path=[str(d) for d in dirs] or None, metadata=metadata,
                       include_defaults=len(offline) < len(ev.tasks))  # skips seconds of indexing when offline


def _run_task(lm: KvexpLM, task: str, manager: TaskManager, ev: EvalConfig) -> dict:
    from unittest import mock

    import lm_eval
    import lm_eval.evaluator

    from kvexp.tracking import git_commit

    try:
        # lm-eval records `git describe` of the working directory, which prints "fatal: not a git repository" to the
        # terminal outside one; kvexp's commit is what produced these scores
        with mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", git_commit):
            results = lm_eval.simple_evaluate(
                model=lm, tasks=[task], task_manager=manager, limit=task_limit(ev, task), num_fewshot=ev.num_fewshot,
                random_seed=ev.seed, numpy_random_seed=ev.seed, torch_random_seed=ev.seed,
                fewshot_random_seed=ev.seed, log_samples=True)
    except Exception as e:  # lm-eval, datasets and the engine raise many types; all end this task the same way
        raise TaskFailed(f"eval task {task} failed: {type(e).__name__}: {e}") from e
    if results is None or not results.get("results"):
        raise TaskFailed(f"eval task {task} failed: lm-eval returned no results")
    return results


def flatten_metrics(results: dict) -> dict[str, float]:
    """lm-eval's {task: {"acc,none": x, "acc_stderr,none": s, ...}} -> {"acc.<task>.acc": x, ...}.

    The ",none" filter suffix is dropped (another filter becomes ".<filter>"); non-numbers (alias, "N/A"
    stderr) are skipped. Characters MLflow refuses in metric names become "_".
    """
    out = {}
    for task, values in results.items():
        for key, value in values.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            name = f"acc.{task}.{metric}" + ("" if filt == "none" else f".{filt}")
            out[re.sub(r"[^\w\-./ ]", "_", name)] = float(value)
    return out


def _sample_record(s: dict) -> dict:
    """What a reader needs to judge one document: the prompt, the expected and the produced answer, the score."""
    first = s["arguments"][0]
    record = {"doc_id": s["doc_id"], "prompt": first[0], "target": s["target"]}
    if len(first) > 1 and isinstance(first[1], str):  # loglikelihood: the scored continuations (choices)
        record["continuations"] = [a[1] for a in s["arguments"]]
    record.update(output=s["filtered_resps"], resps=s["resps"], score={m: s[m] for m in s["metrics"]})
    return record


def _write_samples(path: Path, samples: list[dict]) -> None:
    from lm_eval.utils import handle_non_serializable

    path.write_text("".join(json.dumps(_sample_record(s), default=handle_non_serializable, ensure_ascii=False)
                            + "\n" for s in samples))


def _merge(merged: dict, results: dict) -> None:
    """Fold one task's results into the run's: per-task tables are merged, run-level values replaced."""
    for key, value in results.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        else:
            merged[key] = value


def _write_json(path: Path, data: dict) -> None:
    from lm_eval.utils import handle_non_serializable

    path.write_text(json.dumps(data, indent=2, default=handle_non_serializable, ensure_ascii=False))
