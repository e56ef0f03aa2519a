"""One job of a sweep: a tracked run through the stages model -> reference -> build -> fidelity -> accuracy -> bench
-> profile.

Each stage's metrics are logged as soon as it ends, with its wall time as time.<stage>_s (model: the checkpoint's
download, checksum or first-use training; build includes calibration, also logged as quant.calib_s), so a later
failure loses nothing already measured.
A failing job ends its run FAILED with the traceback as an artifact and returns; the sweep goes on. Ctrl-C ends
it KILLED. A run left RUNNING by a killed process is marked KILLED by the next job with its config hash, which
then runs it again.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from kvexp.bench import perf, profile
from kvexp.checkpoint import resolve_model
from kvexp.config import RunSpec, canonical
from kvexp.core import memory
from kvexp.engines import engine_class
from kvexp.evaluate import fidelity
from kvexp.tracking import TAG, Tracker, flatten, git_commit, gpu_tags, scrub

log = logging.getLogger("kvexp")
PARENT_ENV = "KVEXP_PARENT_RUN_ID"  # set by the sweep's entry point; jobs (in any process) nest under it
SWEEP_ENV = "KVEXP_SWEEP_ID"
JOBS_ENV = "KVEXP_SWEEP_JOBS"
STAGE_TAG = TAG + "stage"  # the stage a job is in: a FAILED or KILLED run's says where it stopped
LOADING_STAGES = ("model", "reference", "build")  # the stages that read model.path's files


class ConsoleFilter(logging.Filter):
    """The console's share of the log (conf/config.yaml, hydra.job_logging): kvexp's and Hydra's records, and any
    library's errors. The rest (lm-eval's INFO, Python warnings from ModelOpt, matplotlib...) is in the log file."""

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name.split(".")[0] in ("kvexp", "hydra", "HYDRA", "__main__")
        return ours or record.levelno >= logging.ERROR


def log_files() -> list[Path]:
    """The files this process logs to: the job's log file under Hydra (its root logger's file handler)."""
    return [Path(h.baseFilename) for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


def run_tags(spec: RunSpec, extra: Optional[dict] = None) -> dict[str, str]:
    """What a run is, for search and for compare's pairing: labels, the build's machine and libraries, its kernel."""
    c, b = spec.cfg, spec.build
    tags = {"config_hash": spec.config_hash, "model": c.model.name, "model_path": c.model.path,
            "model_fingerprint": b.model_fingerprint, "quant": c.quant.name, "engine": b.engine,
            "context": c.context.name, "git_commit": git_commit(), "versions": str(b.versions),
            "device": b.device_name, "dtype": b.dtype, "attention": b.attention, "numerics": b.numerics,
            "sweep_id": os.environ.get(SWEEP_ENV, ""), "stage": "setup"}
    if b.numerics_only:  # fp8 emulated on a CPU: compare shows no speed for it
        tags["numerics_only"] = "true"
    return {TAG + k: str(v) for k, v in (tags | (extra or {})).items()} | gpu_tags(b.device)


def run_name(spec: RunSpec) -> str:
    c = spec.cfg
    return f"{c.model.name}/{c.quant.name}/{c.context.name}/{spec.engine_options.name}-{spec.config_hash[:8]}"


def run_job(spec: RunSpec, resolved_yaml: str, overrides: list[str], out_dir: Path,
            extra_tags: Optional[dict] = None) -> str:
    """Returns the run's final status: FINISHED, FAILED or SKIPPED (a run with this hash FINISHED, or is RUNNING in
    another process)."""
    tracker = Tracker(spec.cfg.tracking.uri, spec.cfg.tracking.experiment)
    claim = tracker.claim(spec.config_hash, run_name(spec), run_tags(spec, extra_tags), os.environ.get(PARENT_ENV),
                          spec.cfg.force)  # before anything is built: a second sweep of this job skips it
    if (run_id := claim.run_id) is None:
        log.info("skip %s: %s", run_name(spec), claim.why())
        return "SKIPPED"
    try:  # from here on the run always ends: FINISHED, FAILED or KILLED, never left RUNNING
        tracker.log_params(run_id, flatten(canonical(OmegaConf.create(resolved_yaml)))
                           | {"config_hash": spec.config_hash})
        tracker.log_text(run_id, resolved_yaml, "config.yaml")
        tracker.log_text(run_id, "\n".join(overrides) + "\n", "overrides.txt")
        execute(spec, tracker, run_id, out_dir)
    except KeyboardInterrupt:
        tracker.kill(run_id, "interrupted (Ctrl-C / SIGINT)")
        raise
    except Exception as e:  # any failure ends this run, never the sweep
        log.error("%s FAILED: %s: %s (traceback in the run's error.txt)", run_name(spec), type(e).__name__,
                  scrub(str(e)))
        try:  # best effort: a full disk that failed the job fails this write too, and must not hide why
            log_logs(tracker, run_id)
        except OSError as err:
            log.warning("run %s: no logs/ artifact (%s)", run_id, err)
        tracker.fail(run_id, e)
        return "FAILED"
    log_logs(tracker, run_id)
    tracker.end(run_id, "FINISHED")
    return "FINISHED"


def log_logs(tracker: Tracker, run_id: str) -> None:
    """The job's log file as the run's artifact logs/<name>: everything the console left out."""
    for path in log_files():
        if path.is_file():
            for handler in logging.getLogger().handlers:
                handler.flush()
            tracker.log_artifact(run_id, path, "logs")


@contextmanager
def stage(tracker: Tracker, run_id: str, name: str, text: Optional[str] = ""):
    """Tag the run with the stage it is in, say so on the console (text None: quietly; "" says the name), and log
    the stage's wall time as time.<name>_s once it ends."""
    tracker.set_tags(run_id, {STAGE_TAG: name})
    if text is not None:
        prefix = os.environ.get(JOBS_ENV, "")
        log.info("%s%s", f"[{prefix}] " if prefix else "", text or name)
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    log.debug("%s done in %.1f s", name, seconds)
    tracker.log_metrics(run_id, {f"time.{name}_s": seconds})


def execute(spec: RunSpec, tracker: Tracker, run_id: str, out_dir: Path) -> None:
    cfg = spec.cfg
    memory.reset_peak(spec.build.torch_device)  # this job's peak, not the process's (earlier jobs ran here too)
    with stage(tracker, run_id, "model", None):  # later stages find the files in place
        resolve_model(spec)
    ref = None
    if cfg.eval.fidelity.enabled and not fidelity.is_reference(spec):
        # before the run's engine: one model on the device at a time; fidelity says so when it computes one
        with stage(tracker, run_id, "reference", None):
            ref = fidelity.reference(spec)
    engine = engine_class(spec.engine_options.name)(spec)
    try:
        with stage(tracker, run_id, "build", f"build {run_name(spec)}"):
            info = engine.build()
            tracker.log_metrics(run_id, {"build.s": info.build_s, **info.metrics})
        if cfg.eval.fidelity.enabled:
            with stage(tracker, run_id, "fidelity", "fidelity vs fp16"):
                obs = fidelity.observe(engine, spec)
                if ref is None:
                    ref = fidelity.save_reference(spec, obs)
                tracker.log_metrics(run_id, fidelity.compare(ref, obs))
        if cfg.eval.tasks:
            from kvexp.evaluate.accuracy import evaluate_accuracy

            with stage(tracker, run_id, "accuracy", f"accuracy: lm-eval {', '.join(cfg.eval.tasks)}"):
                acc_dir = out_dir / "lm_eval"
                acc_dir.mkdir(parents=True, exist_ok=True)
                try:
                    tracker.log_metrics(run_id, evaluate_accuracy(engine, spec, acc_dir))
                finally:
                    tracker.log_artifact(run_id, acc_dir, "lm_eval")
        if cfg.bench.enabled:
            with stage(tracker, run_id, "bench"):
                tracker.log_metrics(run_id, perf.measure(engine, spec))
                prompts = perf.bench_prompts(engine, cfg.bench.batch_size, cfg.context.prompt_len, cfg.seed)
                tracker.log_metrics(run_id, engine.external_bench(prompts, cfg.context.gen_len,
                                                                  out_dir / "external_bench"))
            if cfg.bench.profile != "none":
                with stage(tracker, run_id, "profile"):
                    prof_dir = out_dir / "profile"
                    try:
                        tracker.log_metrics(run_id, profile.profile_run(engine, spec, prof_dir))
                    finally:
                        if prof_dir.exists():
                            tracker.log_artifact(run_id, prof_dir, "profile")
    finally:
        engine.close()
