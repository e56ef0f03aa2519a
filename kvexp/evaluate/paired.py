"""Paired differences against the fp16 run: the same documents scored by both, so the spread that matters is that
of the per-document differences, not of two independent binomials (issue 18).

    d = paired_difference(run_scores, fp16_scores)   # {doc id: (prompt, score)} each, from samples_<task>.jsonl
    d.mean, d.low, d.high                            # mean difference and its 95% interval

The interval is the normal one on the mean of the n differences, mean ± 1.96 · sd / √n. With documents scored
0 or 1, only the documents where the runs disagree move it; where none do it is [0, 0], and where only a few
do it is narrower than an exact interval would be (read it with the counts, which the table prints).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

Z95 = 1.959964


@dataclass(frozen=True)
class Paired:
    mean: float
    low: float
    high: float
    n: int  # documents scored by both runs
    better: int  # documents the run got right and the baseline wrong
    worse: int  # and the other way round

    def show(self) -> str:
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}] (+{self.better}/-{self.worse} of {self.n})"


def doc_scores(samples_jsonl: str, metric: str) -> dict[int, tuple[str, float]]:
    """doc id -> (prompt, score) from an lm_eval/samples_<task>.jsonl artifact (kvexp.evaluate.accuracy writes it)."""
    out = {}
    for line in samples_jsonl.splitlines():
        record = json.loads(line)
        out[record["doc_id"]] = (record["prompt"], float(record["score"][metric]))
    return out


def paired_difference(run: dict[int, tuple[str, float]], base: dict[int, tuple[str, float]]) -> Paired | None:
    """Mean of run - base over the documents both scored with the same prompt; None when they share none."""
    diffs = [run[i][1] - base[i][1] for i in sorted(run.keys() & base.keys()) if run[i][0] == base[i][0]]
    if not diffs:
        return None
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else 0.0
    half = Z95 * sd / math.sqrt(n)
    return Paired(mean, mean - half, mean + half, n, sum(d > 0 for d in diffs), sum(d < 0 for d in diffs))


METRIC = "exact_match"  # the per-document 0/1 score paired here: the offline generation tasks' (kvexp_recall's)


def table(rows: list, bases: dict, read) -> tuple[list[str], list[list[str]]] | None:
    """(task headers, one row of cells per non-baseline row) for kvexp.compare: each run's exact match against its
    fp16 baseline's on the same documents; None when no row has both. rows/bases are compare's Rows and
    baselines(); read(run_id, artifact path) gives an artifact's text (Tracker.read_text)."""
    tasks = sorted({m.split(".")[1] for r in rows for m in r.metrics
                    if m.startswith("acc.") and m.endswith("." + METRIC)})
    scores: dict = {}

    def scored(run_id: str, task: str) -> dict:
        if (run_id, task) not in scores:
            try:
                scores[run_id, task] = doc_scores(read(run_id, f"lm_eval/samples_{task}.jsonl"), METRIC)
            except Exception:  # MLflow raises several types for a missing artifact: an older run, or none logged
                scores[run_id, task] = {}
        return scores[run_id, task]

    cells = []
    for row in rows:
        base = bases.get(row.config_hash)
        if base is None or base is row:
            continue
        pairs = [paired_difference(scored(row.run_id, t), scored(base.run_id, t)) for t in tasks]
        if any(pairs):
            cells.append(row.labels + [p.show() if p else "-" for p in pairs])
    return (tasks, cells) if cells else None
