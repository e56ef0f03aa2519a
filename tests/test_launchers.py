"""Scale-out: a joblib sweep (2 worker processes, 6 jobs) logging to an `mlflow server` that this module starts.

The tracking URI carries a password (user:password@host, percent-encoded) and the environment an HF token: no file
under the working directory, the store or the cache, and no line of output, holds either, while every job is there
exactly once, FINISHED, under the sweep's one parent run. Two processes claiming the same config hashes through the
server at once get each hash once.

hydra/launcher=kvexp_gpus (one job per GPU): its pool of GPUs driven by fake workers (more jobs than GPUs, a worker
that dies, Ctrl-C), its defaults and refusals with a faked list of GPUs, the GPU tags, four processes writing one
sqlite store at once, and a sweep on two faked GPUs (this machine has none) in which one worker is killed.
"""
import os
import secrets
import signal
import subprocess
import sys
import time
import types
import urllib.request

import pytest
from conftest import free_port
from test_faults import assert_claimed_once, claim_at_once

from kvexp.tracking import PARENT_TAG, TAG, Tracker

PASSWORD = "pw-kvexp-launcher%2F0123456789"  # in the URI; MLflow's variable gets it decoded ("/" for %2F)
SECRET_STEM = "kvexp-launcher"  # in every form the password can take: as typed, decoded, escaped by Hydra
HF_TOKEN = "hf_kvexpLauncherTest0123456789abcdef"
SWEEP = ["-m", "hydra/launcher=kvexp_joblib", "quant=fp16,int8kv", "context.gen_len=8,16,24", "experiment=smoke",
         "eval=none", "eval.fidelity.enabled=false", "bench.iters=1", "bench.warmup=0"]


def wait_until_up(proc: subprocess.Popen, url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with code {proc.returncode}: {proc.stdout.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:  # not listening yet
            time.sleep(0.3)
    pytest.fail(f"mlflow server did not answer {url}/health within {timeout_s} s")


@pytest.mark.parametrize("preset, target, values", [
    ("kvexp_joblib", "JoblibLauncher", {"n_jobs": 2}),
    ("kvexp_gpus", "GpuLauncher", {"n_jobs": None, "gpus": None}),  # kvexp's own (hydra_plugins/kvexp_launcher)
    ("kvexp_slurm", "SlurmLauncher", {"gpus_per_node": 1, "tasks_per_node": 1, "name": "kvexp"}),
    ("submitit_local", "LocalLauncher", {}),  # the plugin's own preset: SLURM's code path on one machine
])
def test_launcher_presets_compose_on_the_plugins(preset, target, values):
    from hydra import compose, initialize_config_dir

    from kvexp.preflight import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        launcher = compose(config_name="config", overrides=[f"hydra/launcher={preset}"],
                           return_hydra_config=True).hydra.launcher
    assert launcher._target_.endswith("." + target)
    assert {k: launcher[k] for k in values} == values


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(tracking URI with credentials, its store dir): `mlflow server`, sqlite backend. Artifacts go through the
    server (mlflow-artifacts:/, as jobs on other machines need), so kvexp's upload path is the one tested here."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/db",
           "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    # No GenAI job workers (7 idle processes); its own session, so its whole group can be stopped
    proc = subprocess.Popen(cmd, env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_until_up(proc, f"http://127.0.0.1:{port}")
        yield f"http://kvexp:{PASSWORD}@127.0.0.1:{port}", root
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def sweep(server, tmp_path_factory):
    """The joblib sweep, run once: (completed process, every run in the store)."""
    uri, _ = server
    cwd = tmp_path_factory.mktemp("sweep")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")} | {"HF_TOKEN": HF_TOKEN}
    proc = subprocess.run([sys.executable, "-m", "kvexp.run", *SWEEP, "tracking=server", f"tracking.uri={uri}"],
                          capture_output=True, text=True, cwd=cwd, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, Tracker(uri, "kvexp").search(), cwd


@pytest.mark.slow
def test_joblib_sweep_logs_every_job_once_under_one_parent(sweep):
    proc, runs, _ = sweep
    assert "6 job(s): 6 finished, 0 failed, 0 skipped" in proc.stdout
    parents = [r for r in runs if r.data.tags.get(TAG + "sweep") == "true"]
    jobs = [r for r in runs if r not in parents]
    assert len(parents) == 1 and len(jobs) == 6
    assert all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags[TAG + "config_hash"] for r in jobs}) == 6
    assert {r.data.params["context.gen_len"] for r in jobs} == {"8", "16", "24"}
    assert {r.data.tags[PARENT_TAG] for r in jobs} == {parents[0].info.run_id}
    # the jobs ran in joblib's worker processes, not in the sweep's: the parent reached them through the environment
    worker_pids = {r.data.tags[TAG + "pid"] for r in jobs}
    assert len(worker_pids) == 2 and parents[0].data.tags[TAG + "pid"] not in worker_pids
    assert len({r.data.tags[TAG + "sweep_id"] for r in runs}) == 1
    assert all(r.info.artifact_uri.startswith("mlflow-artifacts:") for r in runs)
    for k in range(1, 7):
        assert f"[job {k}/6] build" in proc.stdout


@pytest.mark.slow
def test_credentials_reach_no_file_and_no_output(sweep, server, offline_env):
    proc, runs, cwd = sweep
    _, root = server
    # the raw bytes of every file: the store (params, tags, metrics, artifacts), Hydra's outputs, kvexp's cache
    assert any(p.name == "multirun.yaml" for p in cwd.rglob("*"))  # Hydra's own records are among those scanned
    files = [p for top in (root, cwd, offline_env) for p in top.rglob("*") if p.is_file()]
    assert [str(p) for p in files if SECRET_STEM.encode() in (data := p.read_bytes()) or HF_TOKEN.encode() in data] \
        == []
    assert SECRET_STEM not in proc.stdout + proc.stderr and HF_TOKEN not in proc.stdout + proc.stderr
    for run in runs:
        for value in [*run.data.params.values(), *run.data.tags.values()]:
            assert SECRET_STEM not in value and HF_TOKEN not in value
    artifacts = [p.name for p in (root / "artifacts").rglob("*") if p.is_file()]
    assert {"config.yaml", "overrides.txt"} <= set(artifacts)
    port = server[0].rsplit(":", 1)[1]
    parent = next(r for r in runs if r.data.tags.get(TAG + "sweep") == "true")
    assert f"tracking.uri=http://127.0.0.1:{port}" in parent.data.tags[TAG + "command"]  # the URI, without them
    summary = next(line for line in proc.stdout.splitlines() if line.startswith("kvexp: 6 job(s)"))
    assert summary.endswith(f"store: http://127.0.0.1:{port}")

def test_two_processes_claiming_the_same_hashes_through_a_server_get_each_once(server, tmp_path):
    from mlflow.entities import ViewType

    hashes = [secrets.token_hex(32) for _ in range(6)]
    tracker = Tracker(server[0], "kvexp-claims")
    tracker.prepare()
    assert_claimed_once(tracker, hashes, claim_at_once(tracker, tmp_path, hashes))
    lost = tracker.client.search_runs([tracker.prepare()], run_view_type=ViewType.DELETED_ONLY)
    assert {r.info.status for r in lost} <= {"KILLED"}  # a run that lost its claim: ended as a skip, then deleted
    assert all(r.data.tags[TAG + "skipped"].endswith("holds its config hash") for r in lost)


# ---- hydra/launcher=kvexp_gpus: one job per GPU (kvexp/launcher.py) ----
def test_hydra_finds_the_kvexp_gpus_plugin():
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher

    from kvexp.launcher import TARGET

    assert TARGET in {f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Launcher)}


class FakeWorker:
    """A worker process that exits with `code` at its `polls`-th poll, or at once on SIGINT; every start and end
    goes to `events` as (what, job, gpu)."""

    def __init__(self, job: int, gpu: str, events: list, polls: int, code: int = 0):
        self.job, self.gpu, self.events, self.polls, self.code = job, gpu, events, polls, code
        self.pid, self.returncode, self.signals = 1000 + job, None, []
        events.append(("start", job, gpu))

    def _exit(self, code: int) -> None:
        self.returncode = code
        self.events.append(("end", self.job, self.gpu))

    def poll(self):
        if self.returncode is None:
            self.polls -= 1
            if self.polls <= 0:
                self._exit(self.code)
        return self.returncode

    def send_signal(self, sig):
        self.signals.append(sig)
        self._exit(-sig)

    def kill(self):
        self._exit(-signal.SIGKILL)

    def wait(self):
        return self.returncode


def busy_gpus(events: list) -> list[list[str]]:
    """The GPUs busy after each event, one entry per running job (a GPU twice: two jobs on it at once)."""
    running, out = [], []
    for what, _, gpu in events:
        running.append(gpu) if what == "start" else running.remove(gpu)
        out.append(sorted(running))
    return out


def run_schedule(gpus: list[str], polls: list[int], codes: dict[int, int] = {}):
    from kvexp.launcher import schedule

    events, workers = [], {}

    def start(job, gpu):
        workers[job] = FakeWorker(job, gpu, events, polls[job], codes.get(job, 0))
        return workers[job]

    return list(schedule(len(polls), gpus, start, poll_s=0)), events, workers


def test_more_jobs_than_gpus_run_one_per_gpu_at_a_time():
    ended, events, _ = run_schedule(["0", "1"], polls=[3, 1, 2, 1, 5, 1])
    assert sorted(e.job for e in ended) == list(range(6)) and {e.code for e in ended} == {0}
    busy = busy_gpus(events)
    assert all(len(set(b)) == len(b) for b in busy)  # never two jobs on one GPU
    assert max(map(len, busy)) == 2 and busy[-1] == []
    assert [job for what, job, _ in events if what == "start"] == list(range(6))  # in order, as GPUs free up
    assert {gpu for _, _, gpu in events} == {"0", "1"}


def test_a_dead_worker_gives_its_gpu_back_and_the_other_jobs_go_on():
    ended, events, workers = run_schedule(["0", "1"], polls=[1, 6, 1, 1], codes={0: -signal.SIGKILL})
    assert {e.job: e.code for e in ended} == {0: -signal.SIGKILL, 1: 0, 2: 0, 3: 0}
    assert ended[0].job == 0 and ended[0].gpu == workers[0].gpu and ended[0].pid == workers[0].pid
    # the dead job's GPU took the next job while job 1 still ran on the other
    assert workers[2].gpu == workers[0].gpu != workers[1].gpu
    assert events.index(("start", 2, workers[2].gpu)) < events.index(("end", 1, workers[1].gpu))
    assert all(len(set(b)) == len(b) for b in busy_gpus(events))


class Interrupted(FakeWorker):
    """Ctrl-C comes while the sweep polls this worker (the first time)."""

    def poll(self):
        if not self.signals and self.polls == 10 ** 9:
            self.polls -= 1
            raise KeyboardInterrupt
        return super().poll()


def test_ctrl_c_stops_the_running_workers_and_starts_no_more():
    from kvexp.launcher import schedule

    events, workers = [], []

    def start(job, gpu):
        workers.append((Interrupted if job == 1 else FakeWorker)(job, gpu, events, polls=10 ** 9))
        return workers[-1]

    with pytest.raises(KeyboardInterrupt):
        list(schedule(3, ["0", "1"], start, poll_s=0))
    assert [w.job for w in workers] == [0, 1]  # job 2 never started
    # neither had ended a second later (a sweep signalled alone): each got its SIGINT, to end its run KILLED
    assert [w.signals for w in workers] == [[signal.SIGINT]] * 2 and busy_gpus(events)[-1] == []


@pytest.fixture
def gpus(monkeypatch):
    """A machine with `gpus.count` GPUs, as CUDA reports them (CUDA_VISIBLE_DEVICES unset unless a test sets it)."""
    import torch

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    machine = types.SimpleNamespace(count=4)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: machine.count)
    return machine


def test_n_jobs_defaults_to_one_job_per_visible_gpu(gpus, monkeypatch):
    from kvexp.launcher import slots

    assert slots(None, None) == ["0", "1", "2", "3"]
    assert slots(None, 2) == ["0", "1"]
    assert slots([3, 1], None) == ["3", "1"] and slots([3, 1], 1) == ["3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7,GPU-x")  # what CUDA sees: the first 2 entries (it found 2)
    gpus.count = 2
    assert slots(None, None) == ["5", "7"]


@pytest.mark.parametrize("gpu_list, n_jobs, count, error", [
    (None, None, 0, r"^hydra/launcher=kvexp_gpus: no CUDA GPU is visible here \(CUDA_VISIBLE_DEVICES=unset\); .*"
                    r"use hydra/launcher=kvexp_joblib for CPU jobs"),
    ([9], None, 4, r"^hydra\.launcher\.gpus=\[9\]: GPU 9 is not visible here; choose among 0, 1, 2, 3 "),
    ([1, 1], None, 4, r"^hydra\.launcher\.gpus=\[1,1\]: name one GPU or more, each once"),
    ([], None, 4, r"^hydra\.launcher\.gpus=\[\]: name one GPU or more"),
    ("0,1", None, 4, r"^hydra\.launcher\.gpus=0,1: a list of GPUs, e\.g\. hydra\.launcher\.gpus=\[0,2\]"),
    (None, 5, 4, r"^hydra\.launcher\.n_jobs=5: between 1 and the 4 GPU\(s\) it may use \(0, 1, 2, 3\), since each "
                 r"job needs a GPU of its own"),
    ([2, 3], 3, 4, r"^hydra\.launcher\.n_jobs=3: between 1 and the 2 GPU\(s\) it may use \(2, 3\)"),
    (None, 0, 4, r"^hydra\.launcher\.n_jobs=0: between 1 and"),
])
def test_what_the_gpu_pool_cannot_honour_is_refused(gpus, gpu_list, n_jobs, count, error):
    from kvexp.errors import ConfigError
    from kvexp.launcher import slots

    gpus.count = count
    with pytest.raises(ConfigError, match=error):
        slots(gpu_list, n_jobs)


FAST = ["experiment=smoke", "eval=none", "eval.fidelity.enabled=false", "bench.iters=1", "bench.warmup=0"]


@pytest.mark.parametrize("args, error", [
    (["engine.device=cuda:1"], "engine.device=cuda:1: hydra/launcher=kvexp_gpus gives each job a GPU of its own; "
                               "leave engine.device=auto and choose the GPUs with hydra.launcher.gpus=[1], or pin a "
                               "run with engine.device=cuda:1 under another launcher"),
    (["engine.device=auto,cpu"], "engine.device=cpu: hydra/launcher=kvexp_gpus runs each job on a GPU; for CPU jobs "
                                 "in parallel use hydra/launcher=kvexp_joblib"),
    (["hydra.launcher.gpus=[0,2]"], "hydra.launcher.gpus=[0,2]: GPU 2 is not visible here; choose among 0, 1 "
                                    "(CUDA's numbering, or CUDA_VISIBLE_DEVICES's entries)"),
])
def test_a_sweep_kvexp_gpus_cannot_place_is_refused_before_anything_runs(args, error, in_tmp, offline_env,
                                                                         monkeypatch, capsys):
    from kvexp import launcher
    from kvexp.run import main

    monkeypatch.setattr(launcher, "visible_gpus", lambda: ["0", "1"])
    assert main(["-m", "hydra/launcher=kvexp_gpus", *FAST, *args]) == 2
    assert capsys.readouterr().err.splitlines() == [f"kvexp: error: {error}"]
    assert not (in_tmp / "mlruns").exists()


def test_an_install_without_the_plugin_is_told_to_install_again(in_tmp, offline_env, monkeypatch, capsys):
    from hydra.core.plugins import Plugins

    from kvexp.run import main

    monkeypatch.setattr(Plugins, "discover", lambda self, kind: [])  # an editable install made before the plugin
    assert main(["-m", "hydra/launcher=kvexp_gpus", *FAST]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "kvexp: error: hydra/launcher=kvexp_gpus: Hydra does not find its plugin (hydra_plugins/kvexp_launcher, new in "
        "this kvexp); install kvexp again (pip install -e .) so that it is installed too"]


def test_a_cpu_machine_has_no_gpus_to_hand_out(in_tmp, offline_env, capsys):
    """The probe itself, on this CPU machine (torch finds no CUDA device): refused, pointing at kvexp_joblib."""
    from kvexp.run import main

    assert main(["-m", "hydra/launcher=kvexp_gpus", *FAST]) == 2
    assert "no CUDA GPU is visible here" in capsys.readouterr().err


def test_a_run_records_the_gpu_it_ran_on(monkeypatch):
    """Index as the host names it (a kvexp_gpus worker sees its GPU as cuda:0) and UUID; its kind is kvexp.device."""
    import torch

    from kvexp.tracking import gpu_tags

    props = types.SimpleNamespace(uuid="6c2d0f1e-0000-4000-8000-0123456789ab", name="NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    expected = {"kvexp.gpu_index": "3", "kvexp.gpu_uuid": "GPU-6c2d0f1e-0000-4000-8000-0123456789ab"}
    assert gpu_tags("cuda:0") == gpu_tags("cuda") == expected
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 6")
    assert gpu_tags("cuda:1")["kvexp.gpu_index"] == "6"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert gpu_tags("cuda:1")["kvexp.gpu_index"] == "1"
    assert gpu_tags("cpu") == {}


# argv: store, experiment, writer name, runs; once ./go exists, claims and logs its runs as a job of a sweep does
WRITER = """
import pathlib, sys, time
from kvexp.tracking import Tracker
tracker = Tracker(sys.argv[1], sys.argv[2])
tracker.prepare()
me, runs = sys.argv[3], int(sys.argv[4])
pathlib.Path("ready" + me).touch()
while not pathlib.Path("go").exists():
    time.sleep(0.01)
for r in range(runs):
    run_id = tracker.claim(f"{me}-{r}", f"w{me}-{r}", {"kvexp.writer": me}).run_id
    tracker.log_params(run_id, {f"p{i}": str(i) for i in range(150)})
    for stage in range(8):
        tracker.set_tags(run_id, {"kvexp.stage": f"s{stage}"})
        tracker.log_metrics(run_id, {f"m{stage}.{j}": j + 0.5 for j in range(5)})
    tracker.log_text(run_id, f"config of {me}-{r}\\n", "config.yaml")
    tracker.end(run_id, "FINISHED")
"""


@pytest.mark.slow
def test_workers_writing_one_sqlite_store_at_once_lose_nothing(tmp_path):
    """4 processes, let go at the same moment, each logging its jobs' runs as kvexp_gpus workers do: every run,
    param, metric, tag and artifact is there, and sqlite's own check passes (MLflow waits up to 20 s on a
    locked database)."""
    import sqlite3

    writers, runs = 4, 2
    tracker = Tracker(f"sqlite:///{tmp_path}/mlruns/mlflow.db", "kvexp")
    tracker.prepare()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, tracker.uri, "kvexp", str(w), str(runs)], cwd=tmp_path,
                              stderr=subprocess.PIPE, text=True) for w in range(writers)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{w}").exists() for w in range(writers)):
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, \
            [p.communicate()[1][-2000:] for p in procs if p.poll() is not None]
        time.sleep(0.05)
    (tmp_path / "go").touch()
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * writers, [e[-2000:] for e in errs]
    with sqlite3.connect(tmp_path / "mlruns" / "mlflow.db") as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    found = Tracker(tracker.uri, "kvexp").search()
    assert sorted(r.info.run_name for r in found) == sorted(f"w{w}-{r}" for w in range(writers) for r in range(runs))
    for run in found:
        assert run.info.status == "FINISHED" and run.data.tags["kvexp.stage"] == "s7"
        assert len(run.data.params) == 150 and len(run.data.metrics) == 40 and run.data.metrics["m7.4"] == 4.5
        assert tracker.read_text(run.info.run_id, "config.yaml") == f"config of {run.info.run_name[1:]}\n"


# Every interpreter started with this directory on PYTHONPATH (the sweep and its workers) runs it first: each job's
# worker notes its GPU and pid in ./jobs.jsonl as it starts and ends the job's stages; job 2's worker then dies, and
# job 1 waits (up to 5 minutes) until job 3 has started.
SITECUSTOMIZE = """
import json, os, pathlib, signal, time
from kvexp import job

execute = job.execute
def note(**entry):
    with open("jobs.jsonl", "a") as f:
        f.write(json.dumps(entry | {"job": os.environ[job.JOBS_ENV], "gpu": os.environ["CUDA_VISIBLE_DEVICES"],
                                    "pid": os.getpid(), "t": time.time()}) + "\\n")
def noted(*args, **kwargs):
    note(at="start")
    if os.environ[job.JOBS_ENV].startswith("job 2/"):
        os.kill(os.getpid(), signal.SIGKILL)
    deadline = time.time() + 300
    while os.environ[job.JOBS_ENV].startswith("job 1/") and '"job 3/' not in pathlib.Path("jobs.jsonl").read_text() \
            and time.time() < deadline:
        time.sleep(0.1)
    execute(*args, **kwargs)
    note(at="end")
job.execute = noted
"""
# The sweep's own process sees two GPUs (this machine has none: its jobs run on the CPU, in workers that each see
# one of the two through CUDA_VISIBLE_DEVICES)
TWO_GPUS = "from kvexp import launcher\nlauncher.visible_gpus = lambda: ['0', '1']\n"


@pytest.mark.slow
def test_a_gpu_sweep_runs_one_job_per_gpu_and_survives_a_dead_worker(in_tmp, offline_env):
    import json
    import re

    from conftest import RUN_CLI

    hooks = in_tmp / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(hooks), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-c", TWO_GPUS + RUN_CLI, "-m", "hydra/launcher=kvexp_gpus",
                           "context.gen_len=8,16,24", *FAST], cwd=in_tmp, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    dead = re.findall(r"^kvexp: error: job 2/3 \(context\.gen_len=16 .*\): its worker process (\d+) on GPU (\d) was "
                      r"killed by SIGKILL .*; GPU \2 went back to the pool and the other jobs went on$",
                      proc.stderr, re.M)
    assert len(dead) == 1, proc.stderr[-3000:]
    assert "3 job(s): 2 finished, 0 failed, 0 not run (the sweep stopped), 1 killed" in proc.stdout
    notes = [json.loads(line) for line in (in_tmp / "jobs.jsonl").read_text().splitlines()]
    by_job = {n["job"].split("/")[0]: n for n in notes if n["at"] == "start"}
    assert sorted(by_job) == ["job 1", "job 2", "job 3"]
    runs = Tracker(f"sqlite:///{in_tmp}/mlruns/mlflow.db", "kvexp").search()
    sweep = next(r for r in runs if r.data.tags.get(TAG + "sweep") == "true")
    jobs = {r.data.params["context.gen_len"]: r for r in runs if r is not sweep}
    assert {k: r.info.status for k, r in jobs.items()} == {"8": "FINISHED", "16": "KILLED", "24": "FINISHED"}
    assert f"process {dead[0][0]} on " in jobs["16"].data.tags[TAG + "killed_reason"]
    # a fresh worker per job, not the sweep's process, each seeing one GPU; job 3 took the GPU job 2's death freed
    pids = [str(by_job[f"job {k}"]["pid"]) for k in (1, 2, 3)]
    assert [jobs[k].data.tags[TAG + "pid"] for k in ("8", "16", "24")] == pids and pids[1] == dead[0][0]
    assert len(set(pids) | {sweep.data.tags[TAG + "pid"]}) == 4
    assert by_job["job 3"]["gpu"] == by_job["job 2"]["gpu"] == dead[0][1] != by_job["job 1"]["gpu"]
    end_of_job_1 = next(n["t"] for n in notes if n["at"] == "end" and n["job"].startswith("job 1/"))
    assert by_job["job 3"]["t"] < end_of_job_1  # it started while job 1 still ran on the other GPU (job 1 waited)
