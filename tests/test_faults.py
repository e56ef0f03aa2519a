"""Faults: a job killed with SIGKILL, a sweep stopped with Ctrl-C, an artifact write that fails half way, two sweeps
of one command at once.

After each, no run is left RUNNING by a dead process, nothing half-written is visible, the store still opens, and
no job ran twice.
"""
import errno
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import RUN_CLI, make_spec
from test_sweep import kvexp_run
from omegaconf import OmegaConf

from kvexp.artifacts import PARTIAL
from kvexp.tracking import HOST, TAG, Tracker

FAST = ["experiment=smoke", "eval=none", "eval.fidelity.enabled=false", "bench.iters=1", "bench.warmup=0"]
# The job's benchmark announces itself in ./busy, then waits: a job caught mid-run, at a known moment.
BUSY = """
import pathlib, time
from kvexp.bench import perf
def busy(*args, **kwargs):
    pathlib.Path("busy").touch()
    time.sleep(600)
perf.measure = busy
"""
# Like BUSY, but the benchmark goes on once ./go exists: a first sweep held inside its first job, then let go
HELD = """
import pathlib, time
from kvexp.bench import perf
measure = perf.measure
def held(*args, **kwargs):
    pathlib.Path("busy").touch()
    while not pathlib.Path("go").exists():
        time.sleep(0.1)
    return measure(*args, **kwargs)
perf.measure = held
"""
# Claims config hashes argv[4:] in store argv[1], experiment argv[2], once ./go exists (argv[3]: its "ready" file)
CLAIMER = """
import pathlib, sys, time
from kvexp.tracking import Tracker
tracker = Tracker(sys.argv[1], sys.argv[2])
tracker.prepare()
pathlib.Path(sys.argv[3]).touch()
while not pathlib.Path("go").exists():
    time.sleep(0.01)
won = [h for h in sys.argv[4:] if tracker.claim(h, "claim-" + h[:8], {}).run_id]
print("claimed:", *won)  # a line of its own: MLflow prints a link for each run it ends
"""


def store(cwd: Path) -> Tracker:
    return Tracker(f"sqlite:///{cwd}/mlruns/mlflow.db", "kvexp")


def readable_runs(cwd: Path) -> list:
    """Every run of the store, read back by a fresh client, after sqlite's own consistency check."""
    with sqlite3.connect(cwd / "mlruns" / "mlflow.db") as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    return store(cwd).search()


def start(cwd: Path, args: list[str], prelude: str = "") -> subprocess.Popen:
    """The CLI in the background, its output in files. SIGINT back to its default: a shell without job control
    starts background commands (this test's pytest, maybe) with SIGINT ignored, and children inherit that."""
    return subprocess.Popen([sys.executable, "-c", prelude + RUN_CLI, *args], cwd=cwd, env=os.environ.copy(),
                            stdout=open(cwd / "out.txt", "w"), stderr=open(cwd / "err.txt", "w"), text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(proc: subprocess.Popen, cwd: Path, ready, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"never saw {what} (exit {proc.wait()}): {(cwd / 'err.txt').read_text()[-2000:]}")
        time.sleep(0.2)


def jobs_and_parents(runs: list) -> tuple[list, list]:
    parents = [r for r in runs if r.data.tags.get(TAG + "sweep") == "true"]
    return [r for r in runs if r not in parents], parents


@pytest.mark.slow
def test_a_run_left_running_by_sigkill_is_marked_killed_and_run_again(in_tmp):
    proc = start(in_tmp, ["-m", *FAST], BUSY)
    wait_for(proc, in_tmp, (in_tmp / "busy").exists, "the job's benchmark start")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert {r.info.status for r in readable_runs(in_tmp)} == {"RUNNING"}  # the job's and the sweep's: orphans

    again = kvexp_run(in_tmp, "-m", *FAST)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "1 finished, 0 failed" in again.stdout and again.stdout.count("was left RUNNING: marked KILLED") == 2
    jobs, parents = jobs_and_parents(readable_runs(in_tmp))
    assert [r.info.status for r in jobs] == ["KILLED", "FINISHED"]  # oldest first
    assert [r.info.status for r in parents] == ["KILLED", "FINISHED"]
    assert jobs[0].data.tags[TAG + "config_hash"] == jobs[1].data.tags[TAG + "config_hash"]
    assert f"process {proc.pid} on " in jobs[0].data.tags[TAG + "killed_reason"]
    assert "is gone" in jobs[0].data.tags[TAG + "killed_reason"]


@pytest.mark.slow
def test_ctrl_c_marks_the_running_job_and_the_sweep_killed(in_tmp):
    args = ["-m", "quant=fp16,int8kv", *FAST, "bench.iters=1000000"]  # a benchmark far longer than the test
    proc = start(in_tmp, args)
    wait_for(proc, in_tmp, lambda: "[job 1/2] bench" in (in_tmp / "out.txt").read_text(), "job 1's benchmark")
    time.sleep(0.5)  # well inside the benchmark loop
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    err, out = (in_tmp / "err.txt").read_text(), (in_tmp / "out.txt").read_text()
    assert err.strip().splitlines() == ["kvexp: interrupted; the runs in progress were marked KILLED, the sweep's too"]
    assert "0 finished, 0 failed, 1 not run (the sweep stopped), 1 killed" in out
    jobs, parents = jobs_and_parents(readable_runs(in_tmp))
    assert [r.info.status for r in jobs] == ["KILLED"] and [r.info.status for r in parents] == ["KILLED"]
    assert jobs[0].data.tags[TAG + "killed_reason"] == "interrupted (Ctrl-C / SIGINT)"
    assert jobs[0].data.tags[TAG + "quant"] == "fp16"


def new_run(tracker: Tracker, **owner: str) -> str:
    run_id = tracker.start_run("r", {TAG + "config_hash": "h" * 64})
    tracker.set_tags(run_id, {TAG + k: v for k, v in owner.items()})
    return run_id


def test_reap_judges_each_run_by_its_owner_process(tmp_path):
    tracker = store(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        born = repr(psutil.Process(alive.pid).create_time())
        runs = {
            "dead": new_run(tracker, pid=str(dead.pid)),
            "alive": new_run(tracker, pid=str(alive.pid), pid_start=born),
            "pid reused": new_run(tracker, pid=str(alive.pid), pid_start=repr(float(born) - 3600)),
            "other host": new_run(tracker, pid=str(dead.pid), host=HOST + "-elsewhere"),
        }
        root = Path(tracker.client.get_run(runs["dead"]).info.artifact_uri.removeprefix("file://"))
        (root / "sub").mkdir(parents=True)
        (root / "sub" / f"{PARTIAL}config.yaml-1234").write_text("half a fi")
        reaped = tracker.reap_stale(tracker.running())
    finally:
        alive.kill()
    assert {run.info.run_id for run, _ in reaped} == {runs["dead"], runs["pid reused"]}
    status = {name: tracker.client.get_run(run_id).info.status for name, run_id in runs.items()}
    assert status == {"dead": "KILLED", "alive": "RUNNING", "pid reused": "KILLED", "other host": "RUNNING"}
    assert "(killed or crashed)" in tracker.client.get_run(runs["dead"]).data.tags[TAG + "killed_reason"]
    assert not list(root.rglob(PARTIAL + "*"))


def test_a_job_reaps_a_stale_run_of_its_own_config_then_runs(tmp_path):
    from kvexp.job import run_job

    spec = make_spec(*FAST[1:], "bench=none", f"tracking.uri=sqlite:///{tmp_path}/mlruns/mlflow.db")
    tracker = store(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tracker.start_run("stale", {TAG + "config_hash": spec.config_hash})
    tracker.set_tags(stale, {TAG + "pid": str(dead.pid)})
    assert run_job(spec, OmegaConf.to_yaml(OmegaConf.structured(spec.cfg)), [], tmp_path / "out") == "FINISHED"
    runs = tracker.search([f"tags.`{TAG}config_hash` = '{spec.config_hash}'"])
    assert [(r.info.run_id == stale, r.info.status) for r in runs] == [(True, "KILLED"), (False, "FINISHED")]


def test_an_artifact_write_that_fails_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    tracker = store(tmp_path)
    run_id = tracker.start_run("r", {})
    tracker.log_text(run_id, "version: 1\n", "config.yaml")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)  # after the bytes went to the temp file: a write cut short
    with pytest.raises(OSError, match="could not write artifact config.yaml .*No space left on device.*free space"):
        tracker.log_text(run_id, "version: 2\n" * 1000, "config.yaml")
    root = Path(tracker.client.get_run(run_id).info.artifact_uri.removeprefix("file://"))
    assert (root / "config.yaml").read_text() == "version: 1\n"
    assert [p.name for p in root.iterdir()] == ["config.yaml"]  # no temp file left behind


def test_a_directory_artifact_keeps_its_layout(tmp_path):
    tracker = store(tmp_path)
    run_id = tracker.start_run("r", {})
    src = tmp_path / "lm_eval"
    (src / "task").mkdir(parents=True)
    (src / "results.json").write_text("{}")
    (src / "task" / "samples.jsonl").write_text("{}\n")
    tracker.log_artifact(run_id, src, "lm_eval")
    tracker.log_artifact(run_id, src / "results.json", "copy")
    listed = {a.path for a in tracker.client.list_artifacts(run_id, "lm_eval")}
    assert listed == {"lm_eval/results.json", "lm_eval/task"}
    assert {a.path for a in tracker.client.list_artifacts(run_id, "lm_eval/task")} == {"lm_eval/task/samples.jsonl"}
    assert {a.path for a in tracker.client.list_artifacts(run_id, "copy")} == {"copy/results.json"}


def claim_at_once(tracker: Tracker, cwd: Path, hashes: list[str], processes: int = 2) -> list[set[str]]:
    """The config hashes that each of several processes, let go at the same moment, claimed in tracker's store."""
    cmd = [sys.executable, "-c", CLAIMER, tracker.uri, tracker.experiment]
    procs = [subprocess.Popen([*cmd, f"ready{i}", *hashes], cwd=cwd, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(processes)]
    deadline = time.monotonic() + 120
    while not all((cwd / f"ready{i}").exists() for i in range(processes)):
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, \
            [p.communicate()[1][-2000:] for p in procs if p.poll() is not None]
        time.sleep(0.05)
    (cwd / "go").touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * processes, [err[-2000:] for _, err in outs]
    lines = [next(line for line in out.splitlines() if line.startswith("claimed:")) for out, _ in outs]
    return [set(line.split()[1:]) for line in lines]


def assert_claimed_once(tracker: Tracker, hashes: list[str], claims: list[set[str]]) -> None:
    """Every hash claimed by exactly one process, which holds the hash's only (RUNNING) run."""
    assert set().union(*claims) == set(hashes) and sum(map(len, claims)) == len(hashes), claims
    for h in hashes:
        runs = tracker.search([f"tags.`{TAG}config_hash` = '{h}'"])
        assert [r.info.status for r in runs] == ["RUNNING"], (h, runs)


def test_two_processes_claiming_the_same_hashes_on_sqlite_get_each_once(tmp_path):
    hashes = [secrets.token_hex(32) for _ in range(8)]
    tracker = store(tmp_path)
    tracker.prepare()
    assert_claimed_once(tracker, hashes, claim_at_once(tracker, tmp_path, hashes))


@pytest.mark.slow
def test_two_sweeps_of_one_command_at_once_run_each_job_once(in_tmp):
    args = ["-m", "quant=fp16,int8kv", *FAST]
    first = start(in_tmp, args, HELD)
    wait_for(first, in_tmp, (in_tmp / "busy").exists, "the first sweep's first benchmark")
    second = kvexp_run(in_tmp, *args)  # while the first holds fp16: it skips fp16 and runs int8kv
    (in_tmp / "go").touch()
    assert first.wait(timeout=300) == 0, (in_tmp / "err.txt").read_text()[-2000:]
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"is RUNNING in process {first.pid} on {HOST}" in second.stdout
    assert "2 job(s): 1 finished, 0 failed, 1 skipped" in second.stdout
    out = (in_tmp / "out.txt").read_text()
    assert "already FINISHED with config hash" in out and "2 job(s): 1 finished, 0 failed, 1 skipped" in out
    jobs, parents = jobs_and_parents(readable_runs(in_tmp))
    assert [r.info.status for r in jobs] == ["FINISHED", "FINISHED"] and len(parents) == 2
    assert len({r.data.tags[TAG + "config_hash"] for r in jobs}) == 2
    owners = [(r.data.tags[TAG + "quant"], r.data.tags[TAG + "pid"] == str(first.pid)) for r in jobs]
    assert owners == [("fp16", True), ("int8kv", False)]  # oldest first: the first sweep's fp16, the second's int8kv
