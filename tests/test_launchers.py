"""Scale-out: a joblib sweep (2 worker processes, 6 jobs) logging to an `mlflow server` that this module starts.

The tracking URI carries a password (user:password@host, percent-encoded) and the environment an HF token: no file
under the working directory, the store or the cache, and no line of output, holds either, while every job is there
exactly once, FINISHED, under the sweep's one parent run. Two processes claiming the same config hashes through the
server at once get each hash once.
"""
import os
import secrets
import signal
import subprocess
import sys
import time
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
