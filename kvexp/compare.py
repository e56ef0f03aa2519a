"""Runs side by side: `python -m kvexp.compare [--sweep ID|latest] [--model X] [--quant X] [--engine X] [--context X]`.

One row per FINISHED run (the latest run of each config hash), one column per measurement, each with its change
against the fp16 run of the same model, context length and engine: a ratio ("0.27x") for speed and memory, a
difference ("-0.19") for accuracy and fidelity. The same table, two PNG plots and a self-contained HTML report
are written to --out, and logged to the sweep's parent run (artifact folder "compare/") when one sweep is chosen.
"""
from __future__ import annotations

import argparse
import base64
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


def _bytes(v: float) -> str:
    unit = "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if abs(v) < 1024:
            break
        v, unit = v / 1024, bigger
    return f"{v:.4g} {unit}"


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
]
# bench.profile runs only: where a decode step's time goes (kvexp/bench/profile.py)
PROFILE = [Column(f"decode {kind}", f"prof.decode_{kind}_frac", lambda v: f"{100 * v:.1f}%", False)
           for kind in ("attention", "matmul", "elementwise")]
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

    @property
    def setting(self) -> tuple:
        """What a baseline must share: the model, the context (name and lengths), the engine, and the build
        environment: a speed ratio across two kinds of GPU, or two torch versions, measures nothing."""
        return self.model_id, self.context, self.prompt_len, self.gen_len, self.engine, self.machine

    @property
    def labels(self) -> list[str]:
        return [self.model, self.quant, f"{self.context} {self.prompt_len}+{self.gen_len}", self.engine,
                self.config_hash[:8]]


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
               machine=(tags.get(TAG + "device", "?"), tags.get(TAG + "versions", "?")))


def _quoted(value: str) -> str:
    if "'" in value or "\\" in value:  # MLflow's filter strings have no escapes
        raise ConfigError(f"{value!r}: a name with a quote or a backslash cannot be searched for")
    return f"'{value}'"


def query(tracker: Tracker, *filters: str) -> list[Row]:
    """FINISHED job runs (sweep parents are not jobs) matching the MLflow filters, oldest first."""
    return [to_row(r) for r in tracker.jobs("attributes.status = 'FINISHED'", *filters)]


def select(tracker: Tracker, sweep_id: Optional[str] = None, **labels: Optional[str]) -> list[Row]:
    """Rows of one sweep and/or with the given model/quant/engine/context, the latest run per config hash."""
    wanted = {"sweep_id": sweep_id} | labels
    latest = {r.config_hash: r for r in query(tracker, *(f"tags.`{TAG}{key}` = {_quoted(value)}"
                                                        for key, value in wanted.items() if value is not None))}
    return sorted(latest.values(), key=lambda r: (r.model, r.engine, r.context, r.prompt_len or 0, r.gen_len or 0,
                                                  r.quant != BASELINE, r.quant))


def baseline_pool(tracker: Tracker) -> list[Row]:
    """Every FINISHED fp16 run, oldest first: where a row's baseline comes from when its own selection has none."""
    return query(tracker, f"tags.`{TAG}quant` = {_quoted(BASELINE)}")


def sweep_parents(tracker: Tracker, *filters: str) -> list:
    return tracker.search([f"tags.`{TAG}sweep` = 'true'", *filters])


def resolve_sweep(tracker: Tracker, text: str) -> str:
    """'latest', a sweep id, a prefix of one, or a parent's name ("sweep-3f9a2c1e") -> the full sweep id."""
    if text == "latest":
        parents = sweep_parents(tracker)
        if not parents:
            raise ConfigError(f"--sweep latest: no sweep in {tracker.shown_uri}; run one with python -m kvexp.run -m ...")
        return parents[-1].data.tags[TAG + "sweep_id"]
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


def acc_columns(rows: list[Row]) -> list[Column]:
    names = sorted({m for r in rows for m in r.metrics if m.startswith("acc.") and not _is_stderr(m)})
    return [Column(name.removeprefix("acc."), name, lambda v: f"{v:.3g}", False) for name in names]


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


def cell(col: Column, row: Row, base: Optional[Row]) -> str:
    value = row.metrics.get(col.metric)
    if value is None or math.isnan(value):
        return "-"
    text = col.show(value)
    if col.metric.startswith("acc.") and (err := row.metrics.get(stderr_name(col.metric))) is not None:
        text += f"±{err:.2g}"
    if base is not None and base is not row and (ref := base.metrics.get(col.metric)) is not None:
        text += f" ({change(col, value, ref)})"
    return text


@dataclass
class Table:
    title: str
    headers: list[str]
    cells: list[list[str]]


def tables(rows: list[Row], pool: list[Row]) -> tuple[list[Table], list[str]]:
    """(tables, footnotes), the one layout the terminal and the HTML report both print. Accuracy gets a table
    of its own: lm-eval suites add several columns per task, too many for one terminal line."""
    bases = baselines(rows, pool)
    profiled = [c for c in PROFILE if any(c.metric in r.metrics for r in rows)]
    groups = [("accuracy (lm-eval, ±stderr)", acc_columns(rows)), ("fidelity vs fp16, speed, memory", FIXED),
              ("decode time by kernel class (bench.profile)", profiled)]
    out = [Table(title, LABELS + [c.header for c in cols],
                 [row.labels + [cell(c, row, bases.get(row.config_hash)) for c in cols] for row in rows])
           for title, cols in groups if cols]
    out += peer_tables(rows)
    notes = [f"(changes) vs the {BASELINE} run of the same model, context and engine on the same machine (device and "
             "library versions): ratio (x) for speed and memory, difference for accuracy and fidelity"]
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
    """One colour per quant, the same in every plot."""
    return {q: f"C{i}" for i, q in enumerate(sorted({r.quant for r in rows}))}


def _point_label(row: Row, rows: list[Row]) -> str:
    many = len({r.setting for r in rows}) > 1
    return f"{row.quant} {row.model}/{row.context}{row.prompt_len}/{row.engine}" if many else row.quant


def plot_quality_vs_memory(rows: list[Row], path: Path) -> Optional[Path]:
    """Accuracy (with stderr bars) and fidelity against peak memory, one panel per measure."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state; PNG output goes through Agg

    measures = [c.metric for c in acc_columns(rows)] + ["fid.top1_agree"]
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
    several = len({(r.model, r.engine) for r in rows}) > 1
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for row in rows:
        if row.prompt_len and "perf.decode_tok_s" in row.metrics:
            label = f"{row.quant} ({row.model}/{row.engine})" if several else row.quant
            series.setdefault((label, row.quant), []).append((row.prompt_len, row.metrics["perf.decode_tok_s"]))
    return {key: sorted(pts) for key, pts in sorted(series.items())}


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
    tabs, notes = tables(rows, pool)
    if tracker is not None and (found := paired.table(rows, baselines(rows, pool), tracker.read_text)):
        tabs.append(Table(f"exact match vs {BASELINE} on the same documents: mean difference [95% interval] "
                          "(documents better/worse)", LABELS + found[0], found[1]))
    text = render_text(tabs, notes)
    pngs = [p for p in (plot_quality_vs_memory(rows, out_dir / "quality_vs_memory.png"),
                        plot_speed_vs_context(rows, out_dir / "speed_vs_context.png")) if p]
    (out_dir / "compare.txt").write_text(text + "\n")
    (out_dir / "compare.html").write_text(render_html(title, tabs, notes, pngs))
    return text, [out_dir / "compare.txt", out_dir / "compare.html", *pngs]


def log_to_parent(tracker: Tracker, sweep_id: str, files: list[Path]) -> Optional[str]:
    """Log the report's files under the sweep's parent run; its run name, or None for a command without one."""
    parents = sweep_parents(tracker, f"tags.`{TAG}sweep_id` = {_quoted(sweep_id)}")
    if not parents:
        return None
    for path in files:  # these files only: --out may be a folder with other things in it
        tracker.log_artifact(parents[-1].info.run_id, path, ARTIFACT_DIR)
    return parents[-1].info.run_name


def sweep_table(tracker: Tracker, sweep_id: str) -> str:
    """The table of one sweep, as a sweep prints it when it ends; the full report (table, plots, HTML) is logged
    to the sweep's parent run as well."""
    rows = select(tracker, sweep_id)
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
