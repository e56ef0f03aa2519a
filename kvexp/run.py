"""Entry point: `python -m kvexp.run [-m] [group=option ...] [key=value ...]`.

Thin on purpose: validate every job up front (kvexp.preflight), open the sweep's parent run, let Hydra run
the jobs (kvexp.job) with any launcher (hydra/launcher=kvexp_joblib, kvexp_slurm: conf/hydra/launcher), then report
how many finished, failed or were skipped. Exit code: 0 every job finished (or was skipped), 1 a job failed or was
killed, 2 bad input or an unreachable store (nothing ran), 130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from kvexp import preflight
from kvexp.resolve import validate
from kvexp.engines import engine_class
from kvexp.errors import KvexpError, UnsupportedConfig
from kvexp.job import JOBS_ENV, LOADING_STAGES, PARENT_ENV, STAGE_TAG, SWEEP_ENV, run_job
from kvexp.secrets import scrub, take_uri_credentials
from kvexp.tracking import TAG, Tracker

log = logging.getLogger("kvexp")


# An absolute path: "../conf" would resolve against the package (pkg://kvexp) when main() is imported, not run
@hydra.main(config_path=str(preflight.CONF_DIR), config_name="config", version_base="1.3")
def hydra_job(cfg: DictConfig) -> str:
    hc = HydraConfig.get()
    logging.captureWarnings(True)  # libraries' warnings into the log (the job's file, not the console: ConsoleFilter)
    total = os.environ.get(JOBS_ENV + "_TOTAL")
    if total:
        os.environ[JOBS_ENV] = f"job {hc.job.num + 1}/{total}"
    try:
        spec = validate(cfg)
    except UnsupportedConfig:  # a sweep cell its engine cannot run: preflight said so, and the sweep goes on
        return "SKIPPED"
    return run_job(spec, OmegaConf.to_yaml(cfg), list(hc.overrides.task), Path(hc.runtime.output_dir))


def summarize(tracker: Tracker, sweep_id: str, plan: preflight.Plan, stopped: Optional[str]) -> Counter:
    runs = tracker.sweep_runs(sweep_id)
    counts = Counter(r.info.status for r in runs)
    for r in runs:
        if r.info.status == "FAILED":
            print(f"kvexp: error: {failure(r.info.run_name, r.data.tags)}", file=sys.stderr)
    jobs = len(plan.specs)
    rest = jobs - len(runs)  # jobs with no run of this command: skipped, or never started if the sweep stopped
    rest_text = f"{rest} not run (the sweep stopped)" if stopped else f"{rest} skipped" + (
        " (already finished, or running in another sweep; force=true re-runs finished ones)" if rest else "")
    killed = f", {counts['KILLED']} killed" if counts["KILLED"] else ""
    killed += f"; {len(plan.refused)} not run by their engine (above)" if plan.refused else ""
    print(f"kvexp: {jobs} job(s): {counts['FINISHED']} finished, {counts['FAILED']} failed, {rest_text}{killed}; "
          f"store: {tracker.shown_uri}")
    return counts


def failure(name: str, tags: dict[str, str]) -> str:
    """One line: the job, the stage it failed in (with model.path where that stage reads it), the error."""
    where = tags.get(STAGE_TAG, "?")
    if where in LOADING_STAGES:
        where += f" of model.path={tags.get(TAG + 'model_path')}"
    error = (tags.get(TAG + "error") or "?").splitlines()[0]
    return f"job {name} FAILED in {where}: {error} (traceback: the run's error.txt)"


def open_store(plan: preflight.Plan) -> Tracker:
    """The sweep's store, reachable, with the runs that killed processes left RUNNING marked KILLED."""
    tracker = Tracker(plan.specs[0].cfg.tracking.uri, plan.specs[0].cfg.tracking.experiment)
    tracker.prepare()
    for run, reason in tracker.reap_stale(tracker.running()):
        print(f"kvexp: note: run {run.info.run_name} ({run.info.run_id}) was left RUNNING: marked KILLED ({reason})")
    if note := legacy_note(tracker):
        print(note)
    return tracker


def legacy_note(tracker: Tracker) -> Optional[str]:
    """Said once per store: until the first run of a kvexp that hashes the resolved build is logged there."""
    jobs = tracker.jobs()
    legacy = sum(TAG + "numerics" not in r.data.tags for r in jobs)
    if not jobs or legacy < len(jobs):
        return None
    return (f"kvexp: note: the {legacy} run(s) in this store predate run hashes over the resolved build (model file "
            "contents, device, library versions); compare and reproduce still find them, and a job like one of them "
            "runs again as a new run")


def launch() -> Optional[str]:
    """Let Hydra run every job; None if it did, else why it stopped: "interrupted" (Ctrl-C) or "error"."""
    try:
        hydra_job()
    except KeyboardInterrupt:
        return "interrupted"
    except SystemExit as e:  # Hydra exits on its own errors (already printed) and on a job process that died
        if e.code not in (0, None):
            return "error"
    except Exception as e:  # Hydra raises some command-line errors itself (e.g. -m with --cfg)
        print(f"kvexp: error: {type(e).__name__}: {scrub(str(e).splitlines()[0] if str(e) else '')}", file=sys.stderr)
        return "error"
    return None


def skipped_to(tracker: Tracker, sweep_id: str, plan: preflight.Plan) -> list:
    """The FINISHED run each job skipped to: the run that held its config hash when the job had none here."""
    ran = {r.data.tags.get(TAG + "config_hash") for r in tracker.sweep_runs(sweep_id)}
    found = (tracker.find_finished(h) for h in dict.fromkeys(s.config_hash for s in plan.specs) if h not in ran)
    return [r for r in found if r is not None]


def finish(tracker: Tracker, sweep_id: str, parent: Optional[str], plan: preflight.Plan,
           stopped: Optional[str]) -> int:
    """End what the jobs could not (a run whose process died or was interrupted), report, close the parent run."""
    tracker.reap_stale(tracker.sweep_runs(sweep_id))
    finished = [r for r in tracker.sweep_runs(sweep_id) if r.info.status == "FINISHED"]
    skipped = skipped_to(tracker, sweep_id, plan)
    if parent and (finished or skipped):  # the side-by-side table (also logged to the parent run) before the summary
        from kvexp.compare import sweep_table

        print(sweep_table(tracker, sweep_id, skipped))
    counts = summarize(tracker, sweep_id, plan, stopped)
    if stopped == "interrupted":
        print("kvexp: interrupted; the runs in progress were marked KILLED" + (", the sweep's too" if parent else ""),
              file=sys.stderr)
    failed = counts["FAILED"] + counts["KILLED"] > 0 or stopped is not None
    if parent:
        tracker.end(parent, "KILLED" if stopped == "interrupted" else "FAILED" if failed else "FINISHED")
    return 130 if stopped == "interrupted" else 1 if failed else 0  # 130: the shell's code for SIGINT


def main(argv: list[str] | None = None) -> int:
    # Hydra reads sys.argv itself and writes it out (multirun.yaml, .hydra/): credentials leave it first
    argv = take_uri_credentials(sys.argv[1:] if argv is None else argv)
    sys.argv[1:] = argv
    try:
        if preflight.shows_only(argv):  # Hydra prints and exits, as in any Hydra app: no job, no store
            return 0 if launch() is None else 1
        plan = preflight.plan(argv)
        dry = [s for s in plan.specs if getattr(s.engine_options, "dry_run", False)]
        if dry:  # print what would be built, import nothing heavy, track nothing
            for spec in dry:
                print(json.dumps(engine_class(spec.engine_options.name).plan(spec), indent=2, default=str))
            return 0
        tracker = open_store(plan)
        for line in plan.refused:
            print(line)
    except KvexpError as e:
        print(f"kvexp: error: {e}", file=sys.stderr)
        return 2
    sweep_id = uuid.uuid4().hex
    os.environ[SWEEP_ENV] = sweep_id  # environment, not globals: jobs may run in other processes (joblib, SLURM)
    parent = None
    if plan.multirun:
        os.environ[JOBS_ENV + "_TOTAL"] = str(len(plan.specs) + len(plan.refused))  # Hydra numbers every cell
        parent = tracker.start_run(f"sweep-{sweep_id[:8]}", {TAG + "sweep_id": sweep_id, TAG + "sweep": "true",
                                                             TAG + "command": " ".join(argv)[:5000]})
        os.environ[PARENT_ENV] = parent
    return finish(tracker, sweep_id, parent, plan, launch())


if __name__ == "__main__":
    sys.exit(main())
