"""Entry point: `python -m kvexp.run [-m] [group=option ...] [key=value ...]`.

Thin on purpose: validate every job up front (kvexp.preflight), open the sweep's parent run, let Hydra run
the jobs (kvexp.job), then report how many finished, failed or were skipped; the exit code says it too.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from collections import Counter
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from kvexp import preflight
from kvexp.config import validate
from kvexp.engines import engine_class
from kvexp.errors import KvexpError
from kvexp.job import JOBS_ENV, PARENT_ENV, SWEEP_ENV, run_job
from kvexp.tracking import TAG, Tracker

log = logging.getLogger("kvexp")


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def hydra_job(cfg: DictConfig) -> str:
    hc = HydraConfig.get()
    total = os.environ.get(JOBS_ENV + "_TOTAL")
    if total:
        os.environ[JOBS_ENV] = f"job {hc.job.num + 1}/{total}"
    return run_job(validate(cfg), OmegaConf.to_yaml(cfg), list(hc.overrides.task), Path(hc.runtime.output_dir))


def summarize(tracker: Tracker, sweep_id: str, jobs: int) -> Counter:
    runs = tracker.sweep_runs(sweep_id)
    counts = Counter(r.info.status for r in runs)
    counts["SKIPPED"] = jobs - len(runs)
    for r in runs:
        if r.info.status == "FAILED":
            print(f"FAILED {r.info.run_name}: {r.data.tags.get(TAG + 'error', '?')}", file=sys.stderr)
    print(f"kvexp: {jobs} job(s): {counts['FINISHED']} finished, {counts['FAILED']} failed, "
          f"{counts['SKIPPED']} skipped (already finished; force=true re-runs); store: {tracker.uri}")
    return counts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        plan = preflight.plan(argv)
        dry = [s for s in plan.specs if getattr(s.engine_options, "dry_run", False)]
        if dry:  # print what would be built, import nothing heavy, track nothing
            for spec in dry:
                print(json.dumps(engine_class(spec.engine_options.name).plan(spec), indent=2, default=str))
            return 0
        tracker = Tracker(plan.specs[0].cfg.tracking.uri, plan.specs[0].cfg.tracking.experiment)
        tracker.prepare()
    except KvexpError as e:
        print(f"kvexp: error: {e}", file=sys.stderr)
        return 2
    sweep_id = uuid.uuid4().hex
    os.environ[SWEEP_ENV] = sweep_id
    parent = None
    if plan.multirun:
        os.environ[JOBS_ENV + "_TOTAL"] = str(len(plan.specs))
        parent = tracker.start_run(f"sweep-{sweep_id[:8]}", {TAG + "sweep_id": sweep_id, TAG + "sweep": "true",
                                                             TAG + "command": " ".join(argv)[:5000]})
        os.environ[PARENT_ENV] = parent
    interrupted = False
    try:
        hydra_job()
    except KeyboardInterrupt:
        interrupted = True
        print("kvexp: interrupted; the running job was marked KILLED", file=sys.stderr)
    except SystemExit as e:  # Hydra exits on its own errors (already printed)
        if e.code not in (0, None):
            interrupted = True
    counts = summarize(tracker, sweep_id, len(plan.specs))
    failed = counts["FAILED"] + counts["KILLED"] > 0 or interrupted
    if parent:
        tracker.end(parent, "KILLED" if interrupted else "FAILED" if failed else "FINISHED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
