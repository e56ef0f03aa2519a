"""The spine end to end: the README's sweep in a subprocess, tracked in a fresh MLflow store."""
import os
import subprocess
import sys

import pytest

from kvexp.tracking import PARENT_TAG, TAG, Tracker

METRICS = ["build.s", "fid.kl_mean", "fid.top1_agree", "fid.greedy_agree", "perf.ttft_ms", "perf.tpot_ms",
           "perf.decode_tok_s", "mem.peak_bytes", "mem.weight_bytes", "mem.kv_bytes_per_token"]


def kvexp_run(cwd, *args):
    # a fresh matplotlib cache, as on a user's first run: its font cache is built, and logged, then
    env = os.environ.copy() | {"MPLCONFIGDIR": str(cwd / ".mplconfig")}
    return subprocess.run([sys.executable, "-m", "kvexp.run", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600, env=env)


def runs_in(cwd):
    return Tracker(f"sqlite:///{cwd}/mlruns/mlflow.db", "kvexp").search()


def _fp16_engine_reproduces_the_cached_reference(fp16: dict, int8: dict, monkeypatch) -> None:
    """The fp16 run is the reference: it logs its observation compared with itself (KL 0 by construction). The
    independent check: a fresh fp16 engine in this process observes what the sweep cached as the reference, at
    least 1000x closer (in KL) than the int8kv run, with every top-1 and greedy token equal."""
    from conftest import build_engine, make_spec
    from kvexp.evaluate import fidelity

    def no_build(name):
        raise AssertionError("no cached fidelity reference: this check must read the sweep's, not make its own")
    monkeypatch.setattr(fidelity, "engine_class", no_build)
    ref = fidelity.reference(make_spec("quant=int8kv"))  # what every quantized run compares with
    engine = build_engine("quant=fp16")
    fresh = fidelity.compare(ref, fidelity.observe(engine, engine.spec))
    engine.close()
    assert int8["fid.kl_mean"] > 0  # the yardstick is a real difference
    assert fresh["fid.kl_mean"] <= 1e-3 * int8["fid.kl_mean"], (fresh, int8["fid.kl_mean"])
    assert fresh["fid.top1_agree"] == fp16["fid.top1_agree"] == 1
    assert fresh["fid.greedy_agree"] == fp16["fid.greedy_agree"] == 1


# What the console must not show: other libraries' INFO lines, warnings and progress bars (MLflow's per download), git's
# complaint outside a repository, and a reference stage for jobs that compute no reference
NOISE = ("fatal: not a git repository", "][lm_eval", "INFO lm_eval", "generated new fontManager", "is not tested",
         "KV Cache quantization", "Inserted", "fidelity reference", "computing the fp16 reference",
         "Downloading artifacts")


def _the_console_keeps_what_a_user_needs_and_the_log_has_the_rest(proc, tracker, by_quant) -> None:
    console = (proc.stdout + proc.stderr).split("\n")  # not splitlines(): a progress bar's "\r" redraws one line
    assert not [line for line in console if any(n in line for n in NOISE)]
    # job i/N and its stages, for each job; the table; the summary
    for i in (1, 2, 3):
        assert any(f"[job {i}/3] build" in line for line in console), i
    # Hydra's launch lines, 5 stage lines a job, the two tables, the summary: 35 lines besides progress bars, not 158
    lines = [line for line in console if line.strip() and not any(bar in line for bar in ("it/s]", "s/it]", "%|"))]
    assert len(lines) <= 40, "\n".join(lines)
    logs = {}
    for quant, run in by_quant.items():
        (name,) = [a.path for a in tracker.client.list_artifacts(run.info.run_id, "logs")]
        logs[quant] = tracker.read_text(run.info.run_id, name)
    assert "[job 1/3] build" in logs["fp16"]  # the console's lines are in it too
    assert all("lm_eval" in text for text in logs.values())  # lm-eval's INFO lines went here
    assert "computing the fp16 reference" not in logs["int8kv"]  # fp16's job computed it; the others read it


@pytest.mark.slow
def test_smoke_sweep_tracks_three_runs_and_a_rerun_adds_none(in_tmp, monkeypatch):
    proc = kvexp_run(in_tmp, "-m", "quant=fp16,int8kv,awq", "experiment=smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 finished, 0 failed, 0 skipped" in proc.stdout
    assert "vs the fp16 run of the same model" in proc.stdout  # the comparison table printed at the end
    assert all(f" {q} " in proc.stdout for q in ("fp16", "int8kv", "awq"))
    runs = runs_in(in_tmp)
    parents = [r for r in runs if r.data.tags.get(TAG + "sweep") == "true"]
    children = [r for r in runs if r not in parents]
    assert len(parents) == 1 and len(children) == 3
    assert {r.data.tags[PARENT_TAG] for r in children} == {parents[0].info.run_id}
    assert all(r.info.status == "FINISHED" for r in runs)
    hashes = {r.data.tags[TAG + "config_hash"] for r in children}
    assert len(hashes) == 3 and all(len(h) == 64 for h in hashes)
    by_quant = {r.data.tags[TAG + "quant"]: r for r in children}
    for r in children:
        assert set(METRICS) <= set(r.data.metrics), set(METRICS) - set(r.data.metrics)
        # each stage's wall time; together no more than the run's own (calibration inside build)
        m = r.data.metrics
        stages = [f"time.{s}_s" for s in ("model", "build", "fidelity", "accuracy", "bench")]
        stages += ["time.reference_s"] if r is not by_quant["fp16"] else []  # fp16's observation is the reference
        assert all(m[s] > 0 for s in stages), {s: m.get(s) for s in stages}
        assert sum(m[s] for s in stages) <= (r.info.end_time - r.info.start_time) / 1e3
        assert m.get("quant.calib_s", 0) <= m["time.build_s"]
        assert r.data.params["quant.kv_cache.dtype"] in ("auto", "int8")
        for tag in ("model", "engine", "context", "git_commit", "versions", "device"):
            assert r.data.tags[TAG + tag]
    fp16, int8 = by_quant["fp16"].data.metrics, by_quant["int8kv"].data.metrics
    _fp16_engine_reproduces_the_cached_reference(fp16, int8, monkeypatch)
    assert int8["mem.kv_bytes_per_token"] < 0.3 * fp16["mem.kv_bytes_per_token"]  # fp32 on CPU -> int8 + scales
    assert by_quant["awq"].data.metrics["mem.weight_bytes"] < fp16["mem.weight_bytes"]
    # accuracy from lm-eval through the engine, every offline task, for every run
    for r in children:
        for task in ("kvexp_passkey", "kvexp_niah_multikey", "kvexp_vt", "kvexp_arith", "kvexp_ppl"):
            assert any(k.startswith(f"acc.{task}.") for k in r.data.metrics), (r.info.run_name, task)
    # perplexity is scored KV-faithfully for int8kv (the cache is read back), so it moves; fp16 is one-pass
    ppl = "acc.kvexp_ppl.byte_perplexity"
    assert int8[ppl] != fp16[ppl] and abs(int8[ppl] / fp16[ppl] - 1) < 0.01
    tracker = Tracker(f"sqlite:///{in_tmp}/mlruns/mlflow.db", "kvexp")
    artifacts = {a.path for a in tracker.client.list_artifacts(children[0].info.run_id)}
    assert {"config.yaml", "overrides.txt", "logs"} <= artifacts
    _the_console_keeps_what_a_user_needs_and_the_log_has_the_rest(proc, tracker, by_quant)

    again = kvexp_run(in_tmp, "-m", "quant=fp16,int8kv,awq", "experiment=smoke")
    assert again.returncode == 0 and "0 finished, 0 failed, 3 skipped" in again.stdout
    assert len([r for r in runs_in(in_tmp) if r.data.tags.get(TAG + "sweep") != "true"]) == 3


@pytest.mark.slow
def test_a_failing_job_is_failed_and_the_sweep_goes_on(in_tmp):
    broken = in_tmp / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    proc = kvexp_run(in_tmp, "-m", f"model.path=builtin:tiny,{broken}", "experiment=smoke", "bench=none", "eval=none")
    assert proc.returncode == 1
    assert "1 finished, 1 failed" in proc.stdout
    assert "Traceback" not in proc.stderr
    runs = [r for r in runs_in(in_tmp) if r.data.tags.get(TAG + "sweep") != "true"]
    status = {r.data.tags[TAG + "model_path"]: r.info.status for r in runs}
    assert status == {"builtin:tiny": "FINISHED", str(broken): "FAILED"}
    failed = next(r for r in runs if r.info.status == "FAILED")
    assert TAG + "error" in failed.data.tags
    tracker = Tracker(f"sqlite:///{in_tmp}/mlruns/mlflow.db", "kvexp")
    assert "error.txt" in {a.path for a in tracker.client.list_artifacts(failed.info.run_id)}
