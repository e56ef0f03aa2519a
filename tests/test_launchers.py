"""Scale-out: a joblib sweep (2 worker processes, 6 jobs) logging to an `mlflow server` that this module starts.

The tracking URI carries a password (user:password@host) and the environment an HF token: the store must hold
neither, while every job is there exactly once, FINISHED, under the sweep's one parent run.
"""
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port

from kvexp.tracking import PARENT_TAG, TAG, Tracker

PASSWORD = "pw-kvexp-launcher-0123456789"
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
    env = os.environ | {"HF_TOKEN": HF_TOKEN, "MLFLOW_TRACKING_PASSWORD": PASSWORD}
    proc = subprocess.run([sys.executable, "-m", "kvexp.run", *SWEEP, "tracking=server", f"tracking.uri={uri}"],
                          capture_output=True, text=True, cwd=cwd, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, Tracker(uri, "kvexp").search()


@pytest.mark.slow
def test_joblib_sweep_logs_every_job_once_under_one_parent(sweep):
    proc, runs = sweep
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
def test_credentials_reach_no_param_tag_or_artifact(sweep, server):
    proc, runs = sweep
    _, root = server
    parent = next(r for r in runs if r.data.tags.get(TAG + "sweep") == "true")
    assert "tracking.uri=http://***@127.0.0.1" in parent.data.tags[TAG + "command"]  # logged, masked
    for run in runs:
        for value in [*run.data.params.values(), *run.data.tags.values()]:
            assert PASSWORD not in value and HF_TOKEN not in value
    artifacts = [p for p in (root / "artifacts").rglob("*") if p.is_file()]
    assert {"config.yaml", "overrides.txt"} <= {p.name for p in artifacts}
    config = next(p for p in artifacts if p.name == "config.yaml").read_text()
    assert "uri: http://***@127.0.0.1" in config
    for path in [root / "db", *artifacts]:  # the raw bytes: every param, tag, metric and artifact
        data = Path(path).read_bytes()
        assert PASSWORD.encode() not in data and HF_TOKEN.encode() not in data, path
    summary = next(line for line in proc.stdout.splitlines() if line.startswith("kvexp: 6 job(s)"))
    assert summary.endswith("store: http://***@127.0.0.1:" + server[0].rsplit(":", 1)[1])
