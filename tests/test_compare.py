"""kvexp.compare on a real sweep of the tiny model: two quants at two context lengths, in a fresh store."""
import re

import pytest
from test_sweep import kvexp_run

from kvexp import compare
from kvexp.tracking import TAG, Tracker, default_uri


@pytest.fixture(scope="module")
def store(tmp_path_factory, offline_env):
    cwd = tmp_path_factory.mktemp("compare")
    proc = kvexp_run(cwd, "-m", "quant=fp16,int8kv", "context.prompt_len=32,64", "experiment=smoke", "eval=none",
                     "bench.iters=1", "bench.warmup=0")  # accuracy is logged by the test below: lm-eval is slow
    assert proc.returncode == 0, proc.stderr[-3000:]
    tracker = Tracker(default_uri(cwd), "kvexp")
    runs = {(r.data.tags[TAG + "quant"], int(r.data.params["context.prompt_len"])): r
            for r in tracker.search() if r.data.tags.get(TAG + "sweep") != "true"}
    sweep_id = next(iter(runs.values())).data.tags[TAG + "sweep_id"]
    return tracker, runs, sweep_id


def row_of(text: str, quant: str, prompt_len: int) -> str:
    return next(line for line in text.splitlines() if f" {quant} " in line and f" {prompt_len}+" in line)


def test_sweep_table_has_a_row_per_run_with_changes_vs_fp16(store):
    tracker, runs, sweep_id = store
    text = compare.sweep_table(tracker, sweep_id)
    assert text.startswith("fidelity vs fp16")  # no accuracy table: eval=none
    assert len([line for line in text.splitlines() if line.startswith("tiny ")]) == 4
    for n in (32, 64):
        int8, fp16 = runs["int8kv", n].data.metrics, runs["fp16", n].data.metrics
        line = row_of(text, "int8kv", n)
        kv_ratio = int8["mem.kv_bytes_per_token"] / fp16["mem.kv_bytes_per_token"]
        assert f"({kv_ratio:.3g}x)" in line and kv_ratio < 0.3
        assert f"({int8['perf.decode_tok_s'] / fp16['perf.decode_tok_s']:.3g}x)" in line
        assert f"({int8['fid.top1_agree'] - fp16['fid.top1_agree']:+.3g})" in line
        assert "(" not in row_of(text, "fp16", n)  # the baseline has no change against itself


def test_sweep_report_is_logged_to_the_parent_run(store):
    tracker, _, sweep_id = store
    compare.sweep_table(tracker, sweep_id)
    parent = next(r for r in tracker.search([f"tags.`{TAG}sweep` = 'true'"]))
    files = {a.path for a in tracker.client.list_artifacts(parent.info.run_id, "compare")}
    assert files == {f"compare/{n}" for n in ("compare.txt", "compare.html", "quality_vs_memory.png",
                                              "speed_vs_context.png")}
    png = tracker.client.download_artifacts(parent.info.run_id, "compare/speed_vs_context.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_speed_series_is_tok_s_by_context_length_per_quant(store):
    tracker, runs, sweep_id = store
    series = compare.speed_series(compare.select(tracker, sweep_id))
    assert set(series) == {("fp16", "fp16"), ("int8kv", "int8kv")}
    for (quant, _), points in series.items():
        assert points == [(n, runs[quant, n].data.metrics["perf.decode_tok_s"]) for n in (32, 64)]


def test_cli_filter_accuracy_stderr_and_self_contained_html(store, tmp_path, capsys):
    tracker, runs, _ = store
    # Accuracy as the accuracy stage logs it (acc.<task>.<metric> and its _stderr), without running lm-eval.
    acc = "acc.kvexp_passkey.exact_match"
    tracker.log_metrics(runs["fp16", 64].info.run_id, {acc: 1.0, acc + "_stderr": 0.0})
    tracker.log_metrics(runs["int8kv", 64].info.run_id, {acc: 0.75, acc + "_stderr": 0.25})
    code = compare.main(["--quant", "int8kv", "--tracking-uri", tracker.uri, "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "kvexp_passkey.exact_match" in out and "0.75±0.25 (-0.25)" in row_of(out, "int8kv", 64)
    assert "not in this selection" in out
    assert not any(line.startswith("tiny ") and " fp16 " in line for line in out.splitlines())
    page = (tmp_path / "compare.html").read_text()
    assert "0.75±0.25 (-0.25)" in page
    sources = re.findall(r'src="([^"]*)"', page)  # nothing is fetched from elsewhere: both plots are inline
    assert len(sources) == 2 and all(src.startswith("data:image/png;base64,") for src in sources)
    assert not re.search(r"<link|<script|href=|url\(", page)
    assert (tmp_path / "compare.txt").read_text().strip() == out.split("\nreport:")[0].strip()


def test_cli_errors_are_one_line(store, capsys):
    tracker, _, _ = store
    for args in (["--sweep", "ffffffffff"], ["--model", "no-such-model"],
                 ["--tracking-uri", "sqlite:////no/such/dir/mlflow.db"]):
        assert compare.main(args + (["--tracking-uri", tracker.uri] if "--tracking-uri" not in args else [])) == 2
        err = capsys.readouterr().err
        assert err.startswith("kvexp.compare: error: ") and err.count("\n") == 1, err


def test_profile_columns_appear_only_for_profiled_runs():
    from kvexp.compare import PROFILE, Row, tables

    def row(quant, metrics):
        return Row(run_id=quant, name=quant, model="m", quant=quant, context="short", prompt_len=8, gen_len=4,
                   engine="torch", config_hash=quant * 8, sweep_id="s", metrics=metrics)

    plain = [row("fp16", {"perf.decode_tok_s": 10.0}), row("int8kv", {"perf.decode_tok_s": 12.0})]
    assert all("decode attention" not in t.headers for t in tables(plain, plain)[0])
    profiled = [row("fp16", {"prof.decode_attention_frac": 0.688}), row("int8kv", {"prof.decode_attention_frac": 0.615})]
    tab = next(t for t in tables(profiled, profiled)[0] if "decode attention" in t.headers)
    col = tab.headers.index("decode attention")
    assert [r[col] for r in tab.cells] == ["68.8%", "61.5% (-0.073)"]
    assert len(PROFILE) == 3
