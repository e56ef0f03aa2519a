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
        assert not re.search(r"\([-+]|x\)", row_of(text, "fp16", n))  # the baseline has no change against itself


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
    assert set(series) == {("fp16 (fp32)", "fp16"), ("int8kv", "int8kv")}  # a CPU's fp16 preset runs in fp32
    for (_, quant), points in series.items():
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
    assert "kvexp_passkey exact_match" in out and "0.75±0.25 (-0.25)" in row_of(out, "int8kv", 64)
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


def make_row(quant, metrics=None, **fields):
    from kvexp.compare import Row

    values = dict(run_id=quant, name=quant, model="tiny", quant=quant, context="short", prompt_len=8, gen_len=4,
                  engine="torch", config_hash=quant * 8, sweep_id="s", metrics=metrics or {}) | fields
    return Row(**values)


def test_labels_name_the_model_that_ran_and_the_dtype_of_the_baseline():
    labels = {path: make_row("int8kv", model_path=path).labels[0] for path in (
        "builtin:tiny", "/ckpts/Qwen2.5-1.5B-local/", "./my-ckpt", "Qwen/Qwen2.5-0.5B", "builtin:organism")}
    assert labels == {"builtin:tiny": "tiny", "/ckpts/Qwen2.5-1.5B-local/": "Qwen2.5-1.5B-local",
                      "./my-ckpt": "my-ckpt", "Qwen/Qwen2.5-0.5B": "Qwen/Qwen2.5-0.5B",
                      "builtin:organism": "organism"}
    assert make_row("fp16", model="qwen2.5-1.5b", model_path="Qwen/Qwen2.5-1.5B-Instruct").labels[0] == "qwen2.5-1.5b"
    assert make_row("fp16", dtype="float32").labels[1] == "fp16 (fp32)"
    assert make_row("fp16", dtype="bfloat16").labels[1] == "fp16 (bf16)"
    assert make_row("fp16", dtype="float16").labels[1] == "fp16"
    assert make_row("int8kv", dtype="float32").labels[1] == "int8kv"  # its name does not claim a dtype


def test_sweep_table_labels_a_cpu_fp16_row_fp32(store):
    tracker, _, sweep_id = store
    text = compare.sweep_table(tracker, sweep_id)
    lines = [line for line in text.splitlines() if line.startswith("tiny ")]
    assert all(any(" fp16 (fp32) " in line and f" {n}+" in line for line in lines) for n in (32, 64))
    assert not any(re.search(r" fp16 (?!\(fp32\))", line) for line in lines)


def test_rows_are_in_sweep_order_with_the_baseline_first(tmp_path):
    """As a sweep of quant=int8kv,fp16,awq context.prompt_len=8,16 runs them, oldest first; the table reads
    fp16, int8kv, awq at 8, then at 16 (not alphabetically: awq before int8kv)."""
    import time

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "kvexp")
    for quant in ("int8kv", "fp16", "awq"):
        for n in (8, 16):
            run_id = tracker.start_run(f"{quant}-{n}", {TAG + "quant": quant, TAG + "context": "short",
                                                        TAG + "config_hash": f"{quant}{n}", TAG + "sweep_id": "s1"})
            tracker.log_params(run_id, {"context.prompt_len": str(n), "context.gen_len": "4"})
            tracker.end(run_id, "FINISHED")
            time.sleep(0.01)  # distinct start times: MLflow orders by them
    assert [(r.quant, r.prompt_len) for r in compare.select(tracker, "s1")] == [
        ("fp16", 8), ("int8kv", 8), ("awq", 8), ("fp16", 16), ("int8kv", 16), ("awq", 16)]


SMOKE_ACC = {"acc.kvexp_passkey.exact_match": 0.75, "acc.kvexp_passkey.exact_match_stderr": 0.25,
             "acc.kvexp_arith.acc": 0.5, "acc.kvexp_arith.acc_stderr": 0.1, "acc.kvexp_arith.acc_norm": 0.25,
             "acc.kvexp_arith.acc_norm_stderr": 0.1, "acc.kvexp_ppl.word_perplexity": 2000.0,
             "acc.kvexp_ppl.byte_perplexity": 3.0, "acc.kvexp_ppl.bits_per_byte": 1.6,
             "acc.gsm8k.exact_match.strict-match": 0.1, "acc.gsm8k.exact_match.flexible-extract": 0.2}


def test_terminal_accuracy_has_one_column_per_task_and_the_html_every_metric(tmp_path):
    base = make_row("fp16", dict(SMOKE_ACC, **{"acc.kvexp_passkey.exact_match": 1.0}))
    rows = [base, make_row("int8kv", SMOKE_ACC)]
    short = next(t for t in compare.tables(rows, rows, full=False)[0] if t.title.startswith("accuracy"))
    assert short.headers[len(compare.LABELS):] == ["gsm8k", "kvexp_arith", "kvexp_passkey", "kvexp_ppl"]
    assert short.cells[1][len(compare.LABELS):] == ["0.2 (+0)", "0.5±0.1 (+0)", "0.75±0.25 (-0.25)", "2e+03 (+0)"]
    text, _ = compare.write_report(rows, rows, tmp_path, "t")
    assert "gsm8k exact_match.flexible-extract" in text and "acc_norm" not in text and "bits_per_byte" not in text
    assert max(len(line) for line in text.split("\n\n")[0].splitlines()) < 120  # the accuracy table
    page = (tmp_path / "compare.html").read_text()
    for name in SMOKE_ACC:
        if not name.split(".")[2].endswith("_stderr"):
            assert f"<th>{name.removeprefix('acc.')}</th>" in page


def spread(value, lo, hi, name="perf.decode_tok_s"):
    return {name: value, name + "_min": lo, name + "_max": hi}


def test_a_speed_ratio_within_the_spreads_is_not_significant():
    def tok_s_cell(fp16, int8):
        rows = [make_row("fp16", fp16), make_row("int8kv", int8)]
        tab = next(t for t in compare.tables(rows, rows)[0] if "tok/s" in t.headers)
        return tab.cells[1][tab.headers.index("tok/s")]

    assert tok_s_cell(spread(100.0, 60.0, 120.0), spread(98.6, 90.0, 130.0)) == "98.6 (0.986x n.s.)"
    assert tok_s_cell(spread(100.0, 95.0, 105.0), spread(35.5, 30.0, 40.0)) == "35.5 (0.355x)"
    assert tok_s_cell(spread(100.0, 100.0, 100.0), spread(98.0, 98.0, 98.0)) == "98 (0.98x)"  # one iteration each
    assert tok_s_cell({"perf.decode_tok_s": 100.0}, spread(98.0, 90.0, 130.0)) == "98 (0.98x)"  # no spread logged
    assert any("n.s. = not significant" in n for n in compare.tables([make_row("fp16")], [])[1])


def test_capacity_columns_sit_beside_kv_bytes_per_token():
    mem = {"mem.kv_bytes_per_token": 28672.0, "mem.kv_capacity_tokens": 2_400_000.0, "mem.max_batch": 74.0}
    int8 = {"mem.kv_bytes_per_token": 14784.0, "mem.kv_capacity_tokens": 4_654_000.0, "mem.max_batch": 144.0}
    rows = [make_row("fp16", mem), make_row("int8kv", int8)]
    tab = next(t for t in compare.tables(rows, rows)[0] if "KV/token" in t.headers)
    at = tab.headers.index("KV/token")
    assert tab.headers[at:at + 3] == ["KV/token", "KV tokens", "max batch"]
    assert tab.cells[1][at:at + 3] == ["14.44 KiB (0.516x)", "4.654M (1.94x)", "144 (1.95x)"]


def test_an_emulated_format_shows_its_fidelity_but_no_timings():
    timed = spread(100.0, 95.0, 105.0) | {"fid.kl_mean": 0.0}
    rows = [make_row("fp16", timed), make_row("fp8", spread(4.0, 3.9, 4.1) | {"fid.kl_mean": 0.03},
                                              numerics_only=True)]
    tables, notes = compare.tables(rows, rows)
    tab = next(t for t in tables if "tok/s" in t.headers)
    assert tab.cells[1][tab.headers.index("tok/s")] == compare.EMULATED
    assert tab.cells[1][tab.headers.index("KL")] == "0.03 (+0.03)"
    assert tab.cells[0][tab.headers.index("tok/s")] == "100"
    assert any(n.startswith(compare.EMULATED + ":") for n in notes)


def test_the_report_has_each_stages_wall_time_and_the_terminal_leaves_it_out():
    fp16 = {"time.model_s": 3.2, "time.build_s": 10.0, "time.bench_s": 20.0}
    awq = {"time.model_s": 3.1, "time.build_s": 95.0, "time.bench_s": 12.0, "quant.calib_s": 80.5}
    rows = [make_row("fp16", fp16), make_row("awq", awq)]
    assert not any("build" in t.headers for t in compare.tables(rows, rows, full=False)[0])
    tab = next(t for t in compare.tables(rows, rows)[0] if t.title.startswith("wall time by stage"))
    cells = dict(zip(tab.headers, tab.cells[1]))
    assert cells["build"] == "95.0 (9.5x)" and cells["calibration"] == "80.5" and cells["model"].startswith("3.1")
    assert "accuracy" not in tab.headers  # no run had that stage
