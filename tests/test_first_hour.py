"""A user's first hour (issue 16): the main command scores accuracy, refuses up front what cannot work offline or
cannot fit, honours group choices and Hydra's flags, and reports a re-run plainly."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml
from conftest import REPO, compose

from kvexp import preflight
from kvexp.errors import ConfigError


def kvexp(cwd, *args, module="kvexp.run", env=None):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=cwd, timeout=600,
                          env=os.environ.copy() | (env or {}))


def nothing_written(cwd) -> bool:
    return not any((cwd / d).exists() for d in ("mlruns", "outputs", "multirun"))


# ---- 1. the default eval scores accuracy ----
def test_the_default_eval_scores_perplexity_multiple_choice_and_long_context_retrieval():
    from kvexp.evaluate.accuracy import hub_datasets, task_limit
    from kvexp.evaluate.tasks.generators import LONG_TASKS

    ev = compose().eval
    assert ev.name == "default"
    assert "wikitext" in ev.tasks and {"arc_easy", "hellaswag"} & set(ev.tasks)
    assert set(LONG_TASKS) <= set(ev.tasks)  # what reads the KV cache back, at the run's context
    # sized to a minute or two on a GPU: a few hundred multiple-choice items, fewer long documents
    assert all(100 <= task_limit(ev, t) <= 500 for t in ("arc_easy", "hellaswag"))
    assert all(task_limit(ev, t) <= 50 for t in (*LONG_TASKS, "wikitext"))
    assert hub_datasets("wikitext") == ["EleutherAI/wikitext_document_level"]
    assert hub_datasets("kvexp_passkey") == []  # not an lm-eval task: generated offline


# ---- 2. offline: one line at preflight, exit 2, nothing in the store ----
@pytest.mark.parametrize("args", [["-m", "model=tiny", "quant=fp16,int8kv"], ["model=tiny", "eval=standard"]],
                         ids=["default eval sweep", "eval=standard"])
def test_an_unreachable_hub_dataset_is_one_line_at_preflight(args, tmp_path):
    proc = kvexp(tmp_path, *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("kvexp: error: eval.tasks: "), lines
    assert "experiment=smoke" in lines[0] and "experiment=organism" in lines[0]
    assert "compare" not in proc.stdout and nothing_written(tmp_path)


def test_a_hub_that_cannot_be_reached_is_bad_input(monkeypatch):
    """Online but no route to the Hub: the dataset look-up's connection error is one line naming the task."""
    from huggingface_hub import HfApi

    from kvexp.evaluate import accuracy

    class ConnectionError(Exception):  # noqa: A001  (the name kvexp.checkpoint.unreachable knows)
        pass

    def no_route(self, repo, **kwargs):
        raise ConnectionError(f"cannot reach {repo}")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var)
    monkeypatch.setattr(HfApi, "dataset_info", no_route)
    accuracy._check_dataset.cache_clear()
    with pytest.raises(ConfigError, match=r"eval\.tasks: arc_easy reads allenai/ai2_arc from the Hugging Face Hub, "
                                          r"which could not be reached \(ConnectionError\).*experiment=smoke"):
        preflight.plan(["model=tiny", "eval.tasks=[arc_easy]"])
    accuracy._check_dataset.cache_clear()


# ---- 3. a task that cannot fit the context: refused once, at preflight ----
def test_a_task_that_cannot_fit_the_context_is_refused_once_before_anything_is_built(tmp_path):
    proc = kvexp(tmp_path, "-m", "quant=fp16,int8kv,awq", "experiment=smoke", "context.prompt_len=48")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "eval task kvexp_passkey: its instructions and needles take" in lines[0], lines
    assert "raise context.prompt_len" in lines[0] and nothing_written(tmp_path)


# ---- 4. a group chosen on the command line wins over the experiment's ----
@pytest.mark.parametrize("context", preflight.group_options("context"))
def test_a_context_chosen_on_the_command_line_wins_over_experiment_smoke(context):
    preset = yaml.safe_load((REPO / "conf" / "context" / f"{context}.yaml").read_text())
    for order in (["context=" + context, "experiment=smoke"], ["experiment=smoke", "context=" + context]):
        ctx = compose(*order).context
        assert (ctx.name, ctx.prompt_len, ctx.gen_len) == (preset["name"], preset["prompt_len"], preset["gen_len"])


def test_experiment_smoke_labels_its_own_context():
    ctx = compose("experiment=smoke").context
    assert (ctx.name, ctx.prompt_len, ctx.gen_len) == ("smoke", 256, 32)


# ---- 6. Hydra's flags behave as in any Hydra app and touch no store ----
@pytest.mark.parametrize("flags, shown", [
    (["--cfg", "job"], "prompt_len: 32000"), (["-c", "job"], "prompt_len: 32000"), (["--cfg=job"], "prompt_len: 32000"),
    (["--cfg", "job", "--resolve"], "prompt_len: 32000"), (["--cfg", "job", "-p", "context"], "name: long"),
    (["--help"], "== Configuration groups =="), (["--hydra-help"], "Hydra (1."), (["--info", "searchpath"], "conf"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_hydra_flags_show_and_touch_no_store(flags, shown, tmp_path):
    proc = kvexp(tmp_path, *flags, *([] if "help" in flags[0] else ["context=long"]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shown in proc.stdout and "kvexp:" not in proc.stdout + proc.stderr
    assert nothing_written(tmp_path)


def test_an_unknown_flag_is_one_line(tmp_path):
    proc = kvexp(tmp_path, "--bogus")
    assert proc.returncode == 2 and proc.stderr.strip().startswith("kvexp: error: --bogus: not a flag")
    assert nothing_written(tmp_path)


# ---- 7. an all-skipped re-run shows what it skipped to ----
@pytest.mark.slow
def test_an_all_skipped_rerun_prints_the_table_of_the_runs_it_skipped_to(in_tmp):
    args = ["-m", "quant=fp16", "experiment=smoke", "eval=none", "bench=none"]
    first = kvexp(in_tmp, *args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "1 finished, 0 failed, 0 skipped; store" in first.stdout  # no "force=true re-runs" hint for 0 skipped
    again = kvexp(in_tmp, *args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "0 finished, 0 failed, 1 skipped (already finished" in again.stdout
    assert "ran to FINISHED" not in again.stdout
    row = next(line for line in first.stdout.splitlines() if line.startswith("tiny "))
    assert row in again.stdout  # the same row: the run it skipped to
    latest = kvexp(in_tmp, "--sweep", "latest", module="kvexp.compare")  # the newest sweep that has runs: the first
    assert latest.returncode == 0, latest.stderr
    assert row in latest.stdout


# ---- 12. where a run's wall time goes ----
def test_each_stage_logs_its_wall_time_and_a_failing_one_only_where_it_stopped():
    from kvexp import job

    class Store:
        def __init__(self):
            self.tags, self.metrics = {}, {}

        def set_tags(self, run_id, tags):
            self.tags |= tags

        def log_metrics(self, run_id, metrics):
            self.metrics |= metrics

    store = Store()
    with job.stage(store, "r", "build"):
        time.sleep(0.05)
    assert store.tags[job.STAGE_TAG] == "build" and 0.05 <= store.metrics["time.build_s"] < 5
    with pytest.raises(RuntimeError), job.stage(store, "r", "accuracy", None):
        raise RuntimeError("lm-eval broke")
    assert store.tags[job.STAGE_TAG] == "accuracy"  # the failure says where it stopped
    assert "time.accuracy_s" not in store.metrics  # a stage that did not end has no wall time
