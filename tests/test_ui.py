"""kvexp.ui: the MLflow UI on a sweep's store, opened in headless Chromium.

The browser check renders MLflow's JS app, served by kvexp.ui, and reads the resulting DOM: the page comparing
the sweep's job runs must show the experiment's name, each run's name and its kvexp.config_hash tag. The REST
endpoints the page reads are checked against the store as well.
"""
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import free_port
from test_sweep import kvexp_run

from kvexp import ui
from kvexp.tracking import TAG, Tracker, default_uri

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--virtual-time-budget=15000"]  # lets the app's fetches finish before the DOM is dumped
EXP = "ui-test-experiment"  # a name found nowhere in the page unless the experiment was rendered


@pytest.fixture(scope="module")
def store(tmp_path_factory, offline_env):
    if CHROMIUM is None:
        pytest.skip("no chromium binary on PATH: apt-get install -y chromium (Debian) to run the UI test")
    cwd = tmp_path_factory.mktemp("ui")
    # Runs and their tags are what the UI test looks for: no metric is worth the time here.
    proc = kvexp_run(cwd, "-m", "quant=fp16,int8kv", "experiment=smoke", "eval=none", "bench=none",
                     "eval.fidelity.enabled=false", f"tracking.experiment={EXP}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Tracker(default_uri(cwd), EXP)


def terminate(server: subprocess.Popen) -> list[int]:
    """SIGTERM kvexp.ui, which must stop its server's process group; kill and return whatever it left behind."""
    below = psutil.Process(server.pid).children(recursive=True)  # so none of what the test started outlives it
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    time.sleep(1)  # the server's own children exit after it
    survivors = [p for p in below if p.is_running()]
    for p in survivors:
        p.kill()
    return [p.pid for p in survivors]


def api(url: str, endpoint: str, body: dict | None = None) -> dict:
    """GET, or POST with a JSON body: the REST endpoints MLflow's page itself calls."""
    req = urllib.request.Request(f"{url}/ajax-api/2.0/mlflow/{endpoint}",
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def dump_dom(url: str, profile: Path) -> str:
    proc = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_the_ui_shows_the_experiment_runs_and_config_hashes(store, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "ui.log"
    with log.open("w") as err:
        server = subprocess.Popen([sys.executable, "-m", "kvexp.ui", "--port", str(port), "--tracking-uri",
                                   store.uri, "--experiment", EXP], cwd=tmp_path, stdout=subprocess.PIPE,
                                  stderr=err, text=True, start_new_session=True)
    try:
        assert ui.wait_ready(server, url), (f"kvexp.ui exited with {server.poll()}, or its server did not answer "
                                            f"/health within {ui.START_TIMEOUT_S} s: {log.read_text()[-2000:]}")
        assert "kvexp.ui: MLflow UI at http://127.0.0.1:" in server.stdout.readline()
        exp_id = api(url, f"experiments/get-by-name?experiment_name={EXP}")["experiment"]["experiment_id"]
        runs = api(url, "runs/search", {"experiment_ids": [exp_id]})["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"]["tags"]} for r in runs]
        jobs = {r["info"]["run_name"]: (r["info"]["run_id"], t[TAG + "config_hash"])
                for r, t in zip(runs, tags) if TAG + "config_hash" in t}
        assert len(jobs) == 2 and {h for _, h in jobs.values()} == {
            r.data.tags[TAG + "config_hash"] for r in store.search() if TAG + "config_hash" in r.data.tags}

        ids = json.dumps([run_id for run_id, _ in jobs.values()])
        query = urllib.parse.urlencode({"runs": ids, "experiments": json.dumps([exp_id])})
        page = dump_dom(f"{url}/#/compare-runs?{query}", tmp_path / "profile")
        assert EXP in page and TAG + "config_hash" in page
        for name, (_, config_hash) in jobs.items():
            assert name in page and config_hash in page
    finally:
        survivors = terminate(server)
    assert survivors == [], "kvexp.ui left its server running"


def test_a_non_loopback_host_is_refused_without_allow_remote(capsys):
    assert ui.is_loopback("127.0.0.1") and ui.is_loopback("::1") and ui.is_loopback("localhost")
    assert not ui.is_loopback("0.0.0.0") and not ui.is_loopback("example.org")
    assert ui.main(["--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "--allow-remote" in err and err.count("\n") == 1
