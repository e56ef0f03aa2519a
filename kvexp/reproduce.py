"""Re-run a logged run from its config hash: `python -m kvexp.reproduce <hash or prefix> [--tracking-uri URI]`.

The run's own config.yaml artifact is run again as it was logged (nothing is composed, so today's conf/ files
cannot change it), as a new run tagged kvexp.reproduces=<original run id>, then every metric is compared with
the original: deterministic ones (fid.*, acc.*, mem.* but those that depend on the allocator or the memory free)
must be equal, bit for bit; the others (timings: perf.*, build.s, mem.peak_bytes, ...) are reported with their
ratio, for the reader to judge, and a timing with a spread (<metric>_min, _max over the timed iterations) is
judged within it: "not significant" where the two runs' ranges overlap, "outside the spread" where they do not.
Exit code: 0 when every deterministic metric matches, 1 when one differs or the re-run fails, 2 when no run
is found (or its config no longer validates).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Optional

from kvexp.compare import spreads_overlap
from kvexp.errors import ConfigError, KvexpError
from kvexp.tracking import TAG, Tracker

HASH_TAG = TAG + "config_hash"
REPRODUCES = "reproduces"  # run_job prefixes it: the tag is kvexp.reproduces
# mem.* that depend on the allocator's history (the peak, and the working memory derived from it) or on the
# memory free when the run ran (the KV capacity)
MEM_MEASURED = ("mem.peak_bytes", "mem.working_bytes", "mem.kv_capacity_tokens", "mem.max_batch")


def is_deterministic(metric: str) -> bool:
    """Same config, same code, same device -> same value."""
    return metric.startswith(("fid.", "acc.")) or (metric.startswith("mem.") and metric not in MEM_MEASURED)


def spread_of(metric: str, metrics: dict[str, float]) -> Optional[str]:
    """The timing whose spread metric is (perf.ttft_ms for perf.ttft_ms_min), or None."""
    for suffix in ("_min", "_max"):
        if metric.endswith(suffix) and metric.removesuffix(suffix) in metrics:
            return metric.removesuffix(suffix)
    return None


def judge_timing(name: str, original: dict[str, float], new: dict[str, float]) -> str:
    a, b = original.get(name), new.get(name)
    if not a or b is None:
        return "-"
    ratio = f"{b / a:.3g}x"
    overlap = spreads_overlap(original, new, name)
    if overlap is None:
        return ratio
    lo, hi = original[name + "_min"], original[name + "_max"]
    return f"{ratio}, not significant (the spreads overlap)" if overlap else \
        f"{ratio}, outside the spread (original {lo:.4g} to {hi:.4g})"


def find_run(tracker: Tracker, prefix: str):
    """The FINISHED run whose config hash starts with prefix: the earliest that is not itself a reproduction."""
    if not re.fullmatch(r"[0-9a-f]{1,64}", prefix):
        raise ConfigError(f"{prefix!r}: a config hash is hex digits (0-9a-f); see the {HASH_TAG} tag of a run")
    runs = tracker.search([f"tags.`{HASH_TAG}` LIKE '{prefix}%'"])
    hashes = sorted({r.data.tags[HASH_TAG] for r in runs})
    if not hashes:
        raise ConfigError(f"{prefix}: no run with a config hash starting so in {tracker.shown_uri} "
                          f"(experiment {tracker.experiment})")
    if len(hashes) > 1:
        names = {h: next(r.info.run_name for r in runs if r.data.tags[HASH_TAG] == h) for h in hashes}
        raise ConfigError(f"{prefix}: ambiguous, {len(hashes)} config hashes start so; give more digits:\n"
                          + "\n".join(f"  {h[:16]}  {names[h]}" for h in hashes))
    finished = [r for r in runs if r.info.status == "FINISHED"]
    if not finished:
        states = ", ".join(sorted({r.info.status for r in runs}))
        raise ConfigError(f"{hashes[0][:16]}: no FINISHED run to reproduce (runs with this hash are {states})")
    originals = [r for r in finished if TAG + REPRODUCES not in r.data.tags]
    return (originals or finished)[0]


def rerun(tracker: Tracker, run):
    """Run the logged config again as a new run in the same store; the new run, or None if it FAILED."""
    from omegaconf import OmegaConf

    from kvexp.config import KvexpConfig
    from kvexp.resolve import validate
    from kvexp.job import run_job

    run_id = run.info.run_id
    logged = OmegaConf.create(tracker.read_text(run_id, "config.yaml"))
    # The schema only types the logged YAML (a plain DictConfig would validate to a dict); it composes nothing.
    cfg = OmegaConf.merge(OmegaConf.structured(KvexpConfig), logged)
    cfg.force = True  # the original is FINISHED with this hash: without force, run_job would skip
    cfg.tracking.uri, cfg.tracking.experiment = tracker.uri, tracker.experiment  # the store it was found in
    spec = validate(cfg)
    original_hash = run.data.tags[HASH_TAG]
    if spec.config_hash != original_hash:
        print(f"note: the logged config now hashes to {spec.config_hash[:16]}, not {original_hash[:16]} "
              "(kvexp's schema changed since); re-running the logged config as it is")
    overrides = tracker.read_text(run_id, "overrides.txt").splitlines()  # one per line; may hold spaces
    with tempfile.TemporaryDirectory() as out_dir:
        status = run_job(spec, OmegaConf.to_yaml(cfg), overrides, Path(out_dir), extra_tags={REPRODUCES: run_id})
    new = tracker.search([f"tags.`{TAG}{REPRODUCES}` = '{run_id}'"])[-1]
    print(f"re-ran {run.info.run_name} ({run_id}) as run {new.info.run_id}: {status}")
    return new if status == "FINISHED" else None


def _same(a: Optional[float], b: Optional[float]) -> bool:
    return a == b or (a is not None and b is not None and math.isnan(a) and math.isnan(b))


def compare_metrics(original: dict[str, float], new: dict[str, float]) -> tuple[str, list[str]]:
    """(the metric-by-metric table, the deterministic metrics that differ or are missing on one side)."""
    rows, differ = [("metric", "original", "reproduced", "check")], []
    everything = original | new
    for name in sorted(everything):
        if spread_of(name, everything):
            continue  # shown in its timing's check
        a, b = original.get(name), new.get(name)
        if is_deterministic(name):
            check = "equal" if _same(a, b) else "DIFFERS"
            if check == "DIFFERS":
                differ.append(name)
        else:
            check = judge_timing(name, original, new)
        rows.append((name, "-" if a is None else f"{a:.10g}", "-" if b is None else f"{b:.10g}", check))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    text = "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows)
    return text, differ


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvexp.reproduce", description=__doc__.splitlines()[0])
    p.add_argument("hash", help="a config hash or a prefix of one (tag kvexp.config_hash)")
    p.add_argument("--tracking-uri", help="MLflow store; default sqlite:///<cwd>/mlruns/mlflow.db")
    p.add_argument("--experiment", default="kvexp", help="MLflow experiment (default: kvexp)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per one-file download is noise
    try:
        tracker = Tracker.open_existing(args.tracking_uri, args.experiment)
        original = find_run(tracker, args.hash.lower())
        new = rerun(tracker, original)
    except KvexpError as e:
        print(f"kvexp.reproduce: error: {e}", file=sys.stderr)
        return 2
    if new is None:
        print("kvexp.reproduce: the re-run FAILED (its error.txt artifact has the traceback)", file=sys.stderr)
        return 1
    text, differ = compare_metrics(original.data.metrics, new.data.metrics)
    print(text)
    if differ:
        print(f"kvexp.reproduce: {len(differ)} deterministic metric(s) differ: {', '.join(differ)}")
        return 1
    print("kvexp.reproduce: every deterministic metric is equal; timings are shown as reproduced/original, "
          "judged within their spread over the timed iterations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
