"""kvexp.reproduce: a logged run re-run from its config hash, from another directory, and compared metric by metric."""
import pytest
from test_sweep import kvexp_run

from kvexp import reproduce
from kvexp.tracking import TAG, Tracker, default_uri


@pytest.fixture(scope="module")
def store(tmp_path_factory, offline_env):
    cwd = tmp_path_factory.mktemp("reproduce")
    # One job (it computes its own fp16 reference), with one cheap lm-eval task so that accuracy is compared too.
    proc = kvexp_run(cwd, "quant=int8kv", "experiment=smoke", "eval.tasks=[kvexp_arith]", "eval.limit=2",
                     "bench.iters=1", "bench.warmup=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    tracker = Tracker(default_uri(cwd), "kvexp")
    return tracker, tracker.search()[0]


def test_reproduce_from_another_directory_matches_exactly(store, in_tmp, capsys):
    tracker, original = store
    config_hash = original.data.tags[TAG + "config_hash"]
    assert reproduce.main([config_hash[:10].upper(), "--tracking-uri", tracker.uri]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith(("acc.", "fid.", "mem.", "perf."))}
    for metric in ("acc.kvexp_arith.acc", "acc.kvexp_arith.acc_stderr", "fid.kl_mean", "fid.top1_agree",
                   "mem.weight_bytes", "mem.kv_bytes_per_token"):
        assert lines[metric].endswith("equal"), lines[metric]
    assert lines["perf.ttft_ms"].endswith("x") and lines["mem.peak_bytes"].endswith("x")
    assert original.data.metrics["fid.kl_mean"] > 0  # int8 KV really moved the logits: equality is not trivial
    new = tracker.search([f"tags.`{TAG}reproduces` = '{original.info.run_id}'"])
    assert len(new) == 1 and new[0].info.status == "FINISHED"
    assert new[0].data.tags[TAG + "config_hash"] == config_hash and new[0].data.params == original.data.params
    assert not (in_tmp / "mlruns").exists()  # the store named by --tracking-uri, not one in the cwd


def test_ambiguous_unknown_and_malformed_hashes_exit_2(store, capsys):
    tracker, _ = store
    for suffix in "ab":  # two hashes that share a prefix no sha256 of a real config will have
        run_id = tracker.start_run(f"fake-{suffix}", {TAG + "config_hash": "0" * 12 + suffix * 52})
        tracker.end(run_id, "FINISHED")
    assert reproduce.main(["0" * 12, "--tracking-uri", tracker.uri]) == 2
    err = capsys.readouterr().err
    assert "ambiguous" in err and "fake-a" in err and "fake-b" in err
    for prefix, message in (("0" * 12 + "c", "no run with a config hash"), ("zz'", "hex digits")):
        assert reproduce.main([prefix, "--tracking-uri", tracker.uri]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_compare_metrics_judges_only_deterministic_metrics():
    original = {"fid.kl_mean": 0.5, "acc.t.acc": 0.75, "mem.kv_bytes_per_token": 272.0, "perf.ttft_ms": 10.0,
                "mem.peak_bytes": 100.0, "build.s": 1.0}
    same = dict(original, **{"perf.ttft_ms": 30.0, "mem.peak_bytes": 90.0, "build.s": 2.0})
    text, differ = reproduce.compare_metrics(original, same)
    assert differ == [] and "3x" in text and "0.9x" in text
    changed = dict(original, **{"acc.t.acc": 0.5})
    del changed["fid.kl_mean"]
    assert reproduce.compare_metrics(original, changed)[1] == ["acc.t.acc", "fid.kl_mean"]


def test_timings_are_judged_within_their_spread_and_capacity_is_not_deterministic():
    def tok_s(value, lo, hi):
        return {"perf.decode_tok_s": value, "perf.decode_tok_s_min": lo, "perf.decode_tok_s_max": hi}

    original = tok_s(10.0, 8.0, 12.0) | {"mem.kv_capacity_tokens": 1e6, "mem.max_batch": 30.0, "fid.kl_mean": 0.5}
    noisy = tok_s(11.0, 9.0, 14.0) | {"mem.kv_capacity_tokens": 9e5, "mem.max_batch": 27.0, "fid.kl_mean": 0.5}
    text, differ = reproduce.compare_metrics(original, noisy)
    lines = {line.split()[0]: line for line in text.splitlines()[1:]}
    assert differ == []  # the memory free when a run ran is not the run's to reproduce
    assert lines["perf.decode_tok_s"].endswith("1.1x, not significant (the spreads overlap)")
    assert "perf.decode_tok_s_min" not in lines and "perf.decode_tok_s_max" not in lines  # folded into the timing
    assert lines["mem.kv_capacity_tokens"].endswith("0.9x")
    far = reproduce.compare_metrics(original, tok_s(579.0, 560.0, 600.0))[0]
    assert "57.9x, outside the spread (original 8 to 12)" in far
