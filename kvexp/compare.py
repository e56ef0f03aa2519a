"""Runs side by side: `python -m kvexp.compare [--sweep ID|latest] [--model X] [--quant X] [--engine X] [--context X]`.

One row per FINISHED run (the latest run of each config hash), in the order the runs ran, each setting's fp16 row
first; one column per measurement, each with its change against the fp16 run of the same model, context length
and engine: a ratio ("0.27x") for speed and memory, a difference ("-0.19") for accuracy and fidelity. A speed
ratio whose two runs' spreads (min to max over the timed iterations) overlap is marked "n.s.", not significant.
The terminal shows each task's main metric; the same tables with every metric, two PNG plots and a
self-contained HTML report are written to --out, and logged to the sweep's parent run (artifact folder
"compare/") when one sweep is chosen.
"""
from __future__ import annotations

import argparse
import base64
import functools
import html
import math
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from kvexp.errors import ConfigError, KvexpError
from kvexp.evaluate import paired
from kvexp.tracking import TAG, Tracker

BASELINE = "fp16"
ARTIFACT_DIR = "compare"
MODEL_PRESETS = Path(__file__).resolve().parents[1] / "conf" / "model"  # the model group's presets
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# A task's main metric, the one its terminal column shows: the first of these it has (lm-eval's usual headline
# metrics), else its first by name. The others are in the HTML report.
MAIN_METRICS = ("exact_match", "acc", "word_perplexity", "f1", "acc_norm")
NOT_SIGNIFICANT = "n.s."
EMULATED = "emulated"  # shown for the timings of a numerics-only run
TIMED = "perf."


def _bytes(v: float) -> str:
    unit = "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if abs(v) < 1024:
            break
        v, unit = v / 1024, bigger
    return f"{v:.4g} {unit}"


def _count(v: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= size:
            return f"{v / size:.4g}{unit}"
    return f"{v:.0f}"


@dataclass(frozen=True)
class Column:
    header: str
    metric: str
    show: Callable[[float], str]
    ratio: bool  # True: change as new/old ("2.1x"); False: as new-old ("-0.3")


FIXED = [
    Column("KL", "fid.kl_mean", lambda v: f"{v:.3g}", False),
    Column("top1", "fid.top1_agree", lambda v: f"{v:.3g}", False),
    Column("greedy", "fid.greedy_agree", lambda v: f"{v:.3g}", False),
    Column("tok/s", "perf.decode_tok_s", lambda v: f"{v:.4g}", True),
    Column("TTFT ms", "perf.ttft_ms", lambda v: f"{v:.4g}", True),
    Column("TPOT ms", "perf.tpot_ms", lambda v: f"{v:.4g}", True),
    Column("peak mem", "mem.peak_bytes", _bytes, True),
    Column("KV/token", "mem.kv_bytes_per_token", _bytes, True),
    # what the memory left after the weights and the runtime holds of this KV format (kvexp.core.memory)
    Column("KV tokens", "mem.kv_capacity_tokens", _count, True),
    Column("max batch", "mem.max_batch", _count, True),
]
# bench.profile runs only: where a decode step's time goes (kvexp/bench/profile.py)
PROFILE = [Column(f"decode {kind}", f"prof.decode_{kind}_frac", lambda v: f"{100 * v:.1f}%", False)
           for kind in ("attention", "matmul", "elementwise")]
# where a job's wall time went, in seconds (kvexp.job's stages; calibration is part of build): the HTML report
TIMES = [Column(stage, f"time.{stage}_s", lambda v: f"{v:.1f}", True)
         for stage in ("model", "reference", "build", "fidelity", "accuracy", "bench", "profile")] + [
    Column("calibration", "quant.calib_s", lambda v: f"{v:.1f}", True),
    Column("KV calibration", "quant.kv_calib_s", lambda v: f"{v:.1f}", True)]
LABELS = ["model", "quant", "context", "engine", "hash"]


@dataclass
class Row:
    """One FINISHED job run, as the table needs it."""
    run_id: str
    name: str
    model: str
    quant: str
    context: str
    prompt_len: Optional[int]
    gen_len: Optional[int]
    engine: str
    config_hash: str
    sweep_id: str
    metrics: dict[str, float] = field(default_factory=dict)
    model_id: str = "?"  # the model's fingerprint (its label for runs logged before kvexp recorded one)
    machine: tuple = ()  # (device name, library versions): the build environment its numbers belong to
    model_path: str = ""  # model.path as it ran ("" for runs logged before kvexp recorded it)
    dtype: str = ""  # the compute dtype it ran in (float32 on a CPU, whatever the preset's name says)
    numerics_only: bool = False  # an emulated format (fp8 on a CPU): its numerics count, its timings do not

    @property
    def setting(self) -> tuple:
        """What a baseline must share: the model, the context (name and lengths), the engine, and the build
        environment: a speed ratio across two kinds of GPU, or two torch versions, measures nothing."""
        return self.model_id, self.context, self.prompt_len, self.gen_len, self.engine, self.machine

    @property
    def model_label(self) -> str:
        """The model it ran: the group's name where model.path is that preset's own, else model.path's name (a
        local checkpoint's folder, a Hub id), so model=tiny model.path=/ckpt/qwen reads "qwen"."""
        if not self.model_path or preset_paths().get(self.model) == self.model_path:
            return self.model
        return self.model_path.rstrip("/").rsplit("/", 1)[-1] if self.model_path.startswith(("/", ".", "~")) \
            else self.model_path.removeprefix("builtin:")

    @property
    def quant_label(self) -> str:
        """The preset's name, and for the unquantized baseline the dtype it really ran in where the name does not
        say it: the "fp16" of a CPU run is fp32."""
        ran = SHORT_DTYPE.get(self.dtype, self.dtype)
        return f"{self.quant} ({ran})" if self.quant == BASELINE and ran and ran != BASELINE else self.quant

    @property
    def labels(self) -> list[str]:
        return [self.model_label, self.quant_label, f"{self.context} {self.prompt_len}+{self.gen_len}", self.engine,
                self.config_hash[:8]]


@functools.lru_cache(maxsize=1)
def preset_paths() -> dict[str, str]:
    """model group preset name -> its model.path."""
    import yaml

    presets = (yaml.safe_load(p.read_text()) or {} for p in sorted(MODEL_PRESETS.glob("*.yaml")))
    return {p["name"]: p["path"] for p in presets if "name" in p and "path" in p}


def _int(text: Optional[str]) -> Optional[int]:
    return int(text) if text and text.isdigit() else None


def to_row(run) -> Row:
    tags, params = run.data.tags, run.data.params
    model = tags.get(TAG + "model", "?")
    return Row(run.info.run_id, run.info.run_name, model, tags.get(TAG + "quant", "?"),
               tags.get(TAG + "context", "?"), _int(params.get("context.prompt_len")),
               _int(params.get("context.gen_len")), tags.get(TAG + "engine", "?"), tags.get(TAG + "config_hash", ""),
               tags.get(TAG + "sweep_id", ""), dict(run.data.metrics),
               model_id=tags.get(TAG + "model_fingerprint", model),
               machine=(tags.get(TAG + "device", "?"), tags.get(TAG + "versions", "?")),
               model_path=tags.get(TAG + "model_path", ""), dtype=tags.get(TAG + "dtype", ""),
               numerics_only=tags.get(TAG + "numerics_only") == "true")


def _quoted(value: str) -> str:
    if "'" in value or "\\" in value:  # MLflow's filter strings have no escapes
        raise ConfigError(f"{value!r}: a name with a quote or a backslash cannot be searched for")
    return f"'{value}'"


def query(tracker: Tracker, *filters: str) -> list[Row]:
    """FINISHED job runs (sweep parents are not jobs) matching the MLflow filters, oldest first."""
    return [to_row(r) for r in tracker.jobs("attributes.status = 'FINISHED'", *filters)]


def select(tracker: Tracker, sweep_id: Optional[str] = None, **labels: Optional[str]) -> list[Row]:
    """Rows of one sweep and/or with the given model/quant/engine/context, the latest run per config hash, in
    sweep order (see in_sweep_order)."""
    wanted = {"sweep_id": sweep_id} | labels
    runs = query(tracker, *(f"tags.`{TAG}{key}` = {_quoted(value)}" for key, value in wanted.items()
                            if value is not None))
    latest = {r.config_hash: r for r in runs}
    return in_sweep_order([r for r in runs if latest[r.config_hash] is r])


def in_sweep_order(rows: list[Row]) -> list[Row]:
    """Rows (oldest first) grouped by setting, the groups in the order they first ran, each group's baseline
    first and the rest as they ran: a sweep of quant=fp16,int8kv,awq context=short,long reads fp16, int8kv, awq
    at short, then the same at long."""
    first: dict[tuple, int] = {}
    for i, row in enumerate(rows):
        first.setdefault(row.setting, i)
    order = sorted(range(len(rows)), key=lambda i: (first[rows[i].setting], rows[i].quant != BASELINE, i))
    return [rows[i] for i in order]


def baseline_pool(tracker: Tracker) -> list[Row]:
    """Every FINISHED fp16 run, oldest first: where a row's baseline comes from when its own selection has none."""
    return query(tracker, f"tags.`{TAG}quant` = {_quoted(BASELINE)}")


def sweep_parents(tracker: Tracker, *filters: str) -> list:
    return tracker.search([f"tags.`{TAG}sweep` = 'true'", *filters])


def resolve_sweep(tracker: Tracker, text: str) -> str:
    """'latest', a sweep id, a prefix of one, or a parent's name ("sweep-3f9a2c1e") -> the full sweep id."""
    if text == "latest":  # the newest sweep that ran a job: a re-run that skipped every job has none
        ids = (p.data.tags[TAG + "sweep_id"] for p in reversed(sweep_parents(tracker)))
        if (latest := next((i for i in ids if tracker.sweep_runs(i)), None)) is None:
            raise ConfigError(f"--sweep latest: no sweep with runs in {tracker.shown_uri}; run one with "
                              "python -m kvexp.run -m ...")
        return latest
    prefix = text.removeprefix("sweep-")
    if not re.fullmatch(r"[0-9a-f]+", prefix):
        raise ConfigError(f"--sweep {text}: a sweep id is hex digits (its parent run is named sweep-<id>), or latest")
    runs = tracker.search([f"tags.`{TAG}sweep_id` LIKE '{prefix}%'"])
    matches = sorted({r.data.tags[TAG + "sweep_id"] for r in runs})
    if len(matches) != 1:
        raise ConfigError(f"--sweep {text}: " + (f"ambiguous: {', '.join(m[:12] for m in matches)}" if matches
                                                 else "no such sweep; --sweep latest takes the newest"))
    return matches[0]


def baselines(rows: list[Row], pool: list[Row]) -> dict[str, Row]:
    """config hash -> the fp16 row of the same setting: from the rows if there, else the latest in the pool of
    every fp16 run (a filter such as --quant int8kv, or a sweep whose fp16 job was skipped, still gets changes)."""
    latest = {r.setting: r for r in pool if r.quant == BASELINE} | {r.setting: r for r in rows if r.quant == BASELINE}
    return {row.config_hash: latest[row.setting] for row in rows if row.setting in latest}


def acc_columns(rows: list[Row], main_only: bool = False) -> list[Column]:
    """One column per accuracy metric, or with main_only one per task (its main metric, headed by the task)."""
    names = sorted({m for r in rows for m in r.metrics if m.startswith("acc.") and not _is_stderr(m)})
    if main_only:
        return [Column(task, name, lambda v: f"{v:.3g}", False) for task, name in main_metrics(names).items()]
    return [Column(name.removeprefix("acc."), name, lambda v: f"{v:.3g}", False) for name in names]


def main_metrics(names: list[str]) -> dict[str, str]:
    """task -> its main metric's name (acc.<task>.<metric>[.<filter>]), unfiltered before filtered."""
    by_task: dict[str, list[str]] = {}
    for name in names:
        by_task.setdefault(name.split(".")[1], []).append(name)

    def rank(name: str) -> tuple:
        parts = name.split(".")
        metric = MAIN_METRICS.index(parts[2]) if parts[2] in MAIN_METRICS else len(MAIN_METRICS)
        return metric, len(parts) > 3, name
    return {task: min(found, key=rank) for task, found in by_task.items()}


def _is_stderr(name: str) -> bool:
    parts = name.split(".")
    return len(parts) > 2 and parts[2].endswith("_stderr")


def stderr_name(name: str) -> str:
    """acc.<task>.<metric>[.<filter>] -> acc.<task>.<metric>_stderr[.<filter>] (lm-eval's naming)."""
    parts = name.split(".")
    parts[2] += "_stderr"
    return ".".join(parts)


def change(col: Column, value: float, base: float) -> str:
    if col.ratio:
        return f"{value / base:.3g}x" if base else "n/a"
    return f"{value - base:+.3g}"


def spreads_overlap(a: dict[str, float], b: dict[str, float], metric: str) -> Optional[bool]:
    """Whether two runs' ranges of a timing (metric_min to metric_max over the timed iterations, kvexp.bench.perf)
    overlap; None where either has none, or both are single points (one timed iteration: no spread known)."""
    try:
        (lo_a, hi_a), (lo_b, hi_b) = ((m[metric + "_min"], m[metric + "_max"]) for m in (a, b))
    except KeyError:
        return None
    if lo_a == hi_a and lo_b == hi_b:
        return None
    return max(lo_a, lo_b) <= min(hi_a, hi_b)


def cell(col: Column, row: Row, base: Optional[Row]) -> str:
    value = row.metrics.get(col.metric)
    if value is None or math.isnan(value):
        return "-"
    if row.numerics_only and col.metric.startswith(TIMED):
        return EMULATED
    text = col.show(value)
    if col.metric.startswith("acc.") and (err := row.metrics.get(stderr_name(col.metric))) is not None:
        text += f"±{err:.2g}"
    if base is not None and base is not row and (ref := base.metrics.get(col.metric)) is not None:
        noise = f" {NOT_SIGNIFICANT}" if spreads_overlap(row.metrics, base.metrics, col.metric) else ""
        text += f" ({change(col, value, ref)}{noise})"
    return text


@dataclass
class Table:
    title: str
    headers: list[str]
    cells: list[list[str]]


def tables(rows: list[Row], pool: list[Row], full: bool = True) -> tuple[list[Table], list[str]]:
    """(tables, footnotes), the one layout the terminal (full=False) and the HTML report (full=True) print.
    Accuracy gets a table of its own, in the terminal one column per task: lm-eval suites log several metrics
    per task, too many for one terminal line."""
    bases = baselines(rows, pool)
    profiled = [c for c in PROFILE if any(c.metric in r.metrics for r in rows)]
    acc = acc_columns(rows, main_only=not full)
    timed = [c for c in TIMES if full and any(c.metric in r.metrics for r in rows)]
    groups = [("accuracy (lm-eval, ±stderr)" + ("" if full else ": each task's main metric"), acc),
              ("fidelity vs fp16, speed, memory", FIXED), ("decode time by kernel class (bench.profile)", profiled),
              ("wall time by stage, s (calibration is part of build)", timed)]
    out = [Table(title, LABELS + [c.header for c in cols],
                 [row.labels + [cell(c, row, bases.get(row.config_hash)) for c in cols] for row in rows])
           for title, cols in groups if cols]
    out += peer_tables(rows)
    notes = [f"(changes) vs the {BASELINE} run of the same model, context and engine on the same machine (device and "
             "library versions): ratio (x) for speed and memory, difference for accuracy and fidelity; "
             f"{NOT_SIGNIFICANT} = not significant: the two runs' timings overlap (min to max over the timed "
             "iterations)"]
    if any(r.numerics_only for r in rows):
        notes.append(f"{EMULATED}: the format is emulated on this machine (fp8 on a CPU): its accuracy and fidelity "
                     "are those of the real format, its timings measure the emulation and are not shown")
    if acc and not full:
        notes.append("accuracy columns: " + ", ".join(f"{c.header} {c.metric.split('.', 2)[2]}" for c in acc)
                     + "; every metric is in the HTML report")
    for row in rows:
        base = bases.get(row.config_hash)
        if base is not None and base not in rows:
            notes.append(f"{row.quant} {row.config_hash[:8]}: its {BASELINE} baseline is run {base.name} "
                         "(not in this selection)")
        elif base is None and row.quant != BASELINE:
            notes.append(f"{row.quant} {row.config_hash[:8]}: no FINISHED {BASELINE} run of its model, context and "
                         f"engine on its machine ({row.machine[0]}, the same library versions): no changes shown")
    return out, notes


# ---- each engine against engine=hf, what users run instead (issue 19) ----
PEER_ENGINE = "hf"
PEER_COLUMNS = [c for c in FIXED if c.ratio]  # speed and memory: what "faster and smaller" means


def peer_tables(rows: list[Row]) -> list[Table]:
    """Per preset, every other engine's row against engine=hf's row of the same model, quant and context
    (ratio this/hf); none when the rows have no such pair."""
    def preset(r: Row) -> tuple:  # the same model files, preset, context and machine
        return r.model_id, r.quant, r.context, r.prompt_len, r.gen_len, r.machine

    peers = {preset(r): r for r in rows if r.engine == PEER_ENGINE}
    pairs = [(r, peers[preset(r)]) for r in rows if r.engine != PEER_ENGINE and preset(r) in peers]
    if not pairs:
        return []
    return [Table(f"vs engine={PEER_ENGINE} with the same model, quant and context (ratio this/{PEER_ENGINE})",
                  LABELS + [c.header for c in PEER_COLUMNS],
                  [row.labels + [cell(c, row, hf) for c in PEER_COLUMNS] for row, hf in pairs])]


def render_text(tabs: list[Table], notes: list[str]) -> str:
    out = []
    for tab in tabs:
        widths = [max(len(x) for x in col) for col in zip(tab.headers, *tab.cells)]

        def line(items: list[str]) -> str:  # labels left, numbers right
            return "  ".join(x.ljust(w) if i < len(LABELS) else x.rjust(w)
                             for i, (x, w) in enumerate(zip(items, widths)))

        out += [tab.title, line(tab.headers), "  ".join("-" * w for w in widths), *map(line, tab.cells), ""]
    return "\n".join(out + notes)


def render_html(title: str, tabs: list[Table], notes: list[str], pngs: list[Path]) -> str:
    """One file with no external reference: the plots are embedded as base64 data URIs."""
    esc = html.escape
    body = "".join(f"<h2>{esc(t.title)}</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in t.headers)
                   + "</tr>" + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in t.cells)
                   + "</table>" for t in tabs)
    imgs = "".join(f'<figure><img alt="{esc(p.stem)}" src="data:image/png;base64,'
                   f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{esc(p.stem)}</figcaption></figure>'
                   for p in pngs)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right;white-space:nowrap}"
            "img{max-width:100%}</style></head><body>"
            f"<h1>{esc(title)}</h1>{body}" + "".join(f"<p>{esc(n)}</p>" for n in notes) + imgs + "</body></html>\n")


def _colors(rows: list[Row]) -> dict[str, str]:
    """One colour per quant, the same in every plot, in sweep order."""
    return {q: f"C{i}" for i, q in enumerate(dict.fromkeys(r.quant for r in rows))}


def _point_label(row: Row, rows: list[Row]) -> str:
    many = len({r.setting for r in rows}) > 1
    return f"{row.quant_label} {row.model_label}/{row.context}{row.prompt_len}/{row.engine}" if many \
        else row.quant_label


def plot_quality_vs_memory(rows: list[Row], path: Path) -> Optional[Path]:
    """Each task's main accuracy metric (with stderr bars) and fidelity against peak memory, one panel each."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state; PNG output goes through Agg

    measures = [c.metric for c in acc_columns(rows, main_only=True)] + ["fid.top1_agree"]
    points = {m: [r for r in rows if m in r.metrics and "mem.peak_bytes" in r.metrics] for m in measures}
    measures = [m for m in measures if points[m]]
    if not measures:
        return None
    colors, ncols = _colors(rows), min(3, len(measures))
    nrows = math.ceil(len(measures) / ncols)
    fig = Figure(figsize=(4.5 * ncols, 3.6 * nrows), layout="constrained")
    for i, metric in enumerate(measures):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for row in points[metric]:
            err = row.metrics.get(stderr_name(metric)) if metric.startswith("acc.") else None
            ax.errorbar(row.metrics["mem.peak_bytes"] / 2**20, row.metrics[metric], yerr=err, fmt="o", capsize=3,
                        color=colors[row.quant], label=_point_label(row, rows))
        ax.set(xlabel="peak memory (MiB)", ylabel=metric, title=metric)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    return path


def speed_series(rows: list[Row]) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(label, quant) -> [(prompt tokens, decode tok/s)], sorted by length; one series per quant (and per
    model/engine when the rows have several)."""
    several = len({(r.model_label, r.engine) for r in rows}) > 1
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for row in rows:
        if row.prompt_len and "perf.decode_tok_s" in row.metrics:
            label = f"{row.quant_label} ({row.model_label}/{row.engine})" if several else row.quant_label
            series.setdefault((label, row.quant), []).append((row.prompt_len, row.metrics["perf.decode_tok_s"]))
    return {key: sorted(pts) for key, pts in series.items()}


def plot_speed_vs_context(rows: list[Row], path: Path) -> Optional[Path]:
    from matplotlib.figure import Figure

    series = speed_series(rows)
    if not series:
        return None
    colors = _colors(rows)
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for (label, quant), pts in series.items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", label=label, color=colors[quant])
    lengths = {x for pts in series.values() for x, _ in pts}
    if max(lengths) >= 10 * min(lengths):
        ax.set_xscale("log")
    ax.set(xlabel="context: prompt tokens", ylabel="decode tok/s", title="decode speed vs context length")
    ax.legend()
    fig.savefig(path, dpi=100)
    return path


def write_report(rows: list[Row], pool: list[Row], out_dir: Path, title: str,
                 tracker: Optional[Tracker] = None) -> tuple[str, list[Path]]:
    """compare.txt, compare.html and the PNGs into out_dir; (the terminal table, the files written). With the
    tracker, a table of paired differences too, from each run's per-document scores (kvexp.evaluate.paired)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paired_tabs = []
    if tracker is not None and (found := paired.table(rows, baselines(rows, pool), tracker.read_text)):
        paired_tabs.append(Table(f"exact match vs {BASELINE} on the same documents: mean difference [95% interval] "
                                 "(documents better/worse)", LABELS + found[0], found[1]))
    tabs, notes = tables(rows, pool, full=False)
    text = render_text(tabs + paired_tabs, notes)
    pngs = [p for p in (plot_quality_vs_memory(rows, out_dir / "quality_vs_memory.png"),
                        plot_speed_vs_context(rows, out_dir / "speed_vs_context.png")) if p]
    (out_dir / "compare.txt").write_text(text + "\n")
    tabs, notes = tables(rows, pool)
    (out_dir / "compare.html").write_text(render_html(title, tabs + paired_tabs, notes, pngs))
    return text, [out_dir / "compare.txt", out_dir / "compare.html", *pngs]


def log_to_parent(tracker: Tracker, sweep_id: str, files: list[Path]) -> Optional[str]:
    """Log the report's files under the sweep's parent run; its run name, or None for a command without one."""
    parents = sweep_parents(tracker, f"tags.`{TAG}sweep_id` = {_quoted(sweep_id)}")
    if not parents:
        return None
    for path in files:  # these files only: --out may be a folder with other things in it
        tracker.log_artifact(parents[-1].info.run_id, path, ARTIFACT_DIR)
    return parents[-1].info.run_name


def sweep_table(tracker: Tracker, sweep_id: str, skipped_to: list = ()) -> str:
    """The table of one sweep, as a sweep prints it when it ends, with the FINISHED runs its skipped jobs found
    (skipped_to); the full report (table, plots, HTML) is logged to the sweep's parent run as well."""
    rows = select(tracker, sweep_id) + [to_row(r) for r in skipped_to]
    if not rows:
        return f"kvexp: no job of sweep {sweep_id[:8]} ran to FINISHED (python -m kvexp.compare shows earlier runs)"
    with tempfile.TemporaryDirectory() as tmp:
        text, files = write_report(rows, baseline_pool(tracker), Path(tmp), f"kvexp sweep {sweep_id[:8]}", tracker)
        log_to_parent(tracker, sweep_id, files)
    return text


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kvexp.compare", description=__doc__.splitlines()[0])
    p.add_argument("--sweep", help="a sweep id (or prefix, or sweep-<id> name), or 'latest'; default: all runs")
    for key in ("model", "quant", "engine", "context"):
        p.add_argument(f"--{key}", help=f"only runs with this {key} name (tag {TAG}{key})")
    p.add_argument("--tracking-uri", help="MLflow store; default sqlite:///<cwd>/mlruns/mlflow.db")
    p.add_argument("--experiment", default="kvexp", help="MLflow experiment (default: kvexp)")
    p.add_argument("--out", type=Path, help="report folder; default outputs/compare/<sweep id or 'all'>")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        tracker = Tracker.open_existing(args.tracking_uri, args.experiment)
        sweep_id = resolve_sweep(tracker, args.sweep) if args.sweep else None
        rows = select(tracker, sweep_id, model=args.model, quant=args.quant, engine=args.engine, context=args.context)
        if not rows:
            raise ConfigError("no FINISHED run matches these filters; drop a filter or check the names "
                              "with python -m kvexp.ui")
    except KvexpError as e:
        print(f"kvexp.compare: error: {e}", file=sys.stderr)
        return 2
    label = sweep_id[:8] if sweep_id else "all"
    out = args.out or Path("outputs") / "compare" / label
    text, files = write_report(rows, baseline_pool(tracker), out,
                               f"kvexp sweep {label}" if sweep_id else "kvexp runs", tracker)
    print(text)
    whole_sweep = sweep_id and not any((args.model, args.quant, args.engine, args.context))
    parent = log_to_parent(tracker, sweep_id, files) if whole_sweep else None  # a filtered view is not the sweep's
    logged = f" (logged to run {parent}, folder {ARTIFACT_DIR}/)" if parent else ""
    print(f"\nreport: {out / 'compare.html'}{logged}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
