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
def lm_eval_task_names() -> frozenset[str]:
    """Every task, group and tag lm-eval ships. Indexing its YAMLs takes seconds, so once per process."""
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager().all_tasks)


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
    from lm_eval.tasks import TaskManager

    ev, ctx = spec.cfg.eval, spec.cfg.context
    offline = [t for t in ev.tasks if t in OFFLINE_TASKS]
    dirs = build_tasks(engine.tokenizer, offline, prompt_len=ctx.prompt_len, gen_len=ctx.gen_len, seed=ev.seed,
                       n=ev.limit or DEFAULT_SAMPLES, cache_dir=spec.cache_dir)
    # lm-eval's RULER tasks size their documents from this metadata (FACTS.md).
    metadata = {"max_seq_lengths": [ctx.prompt_len], "tokenizer": engine.tokenizer.name_or_path}
    return TaskManager(include_path=[str(d) for d in dirs] or None, metadata=metadata,
                       include_defaults=len(offline) < len(ev.tasks))  # skips seconds of indexing when offline


def _run_task(lm: KvexpLM, task: str, manager: TaskManager, ev: EvalConfig) -> dict:
    import lm_eval

    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=[task], task_manager=manager, limit=ev.limit, num_fewshot=ev.num_fewshot,
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
