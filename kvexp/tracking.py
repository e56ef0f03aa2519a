"""The one module that talks to MLflow: the store, runs, params, tags, metrics, artifacts, look-ups by hash.

Default store: sqlite:///<cwd>/mlruns/mlflow.db with artifacts under <cwd>/mlruns/artifacts (absolute URIs,
FACTS.md). The schema and the experiment are created once, up front, under a file lock: parallel jobs
racing on first-time sqlite creation corrupt it.

Nothing is lost or half-written: every run records the process that owns it (kvexp.host, kvexp.pid), so a run left
RUNNING by a killed process is found and marked KILLED (reap_stale); artifacts reach a local store through a temp
file and a rename; every value that goes to the store passes scrub(), which masks credentials (kvexp.secrets); and
a job claims its config hash before it builds (Tracker.claim), so two sweeps of one command never run a job twice.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
import subprocess
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional
from urllib.parse import unquote, urlparse

import psutil
from filelock import FileLock

from kvexp import artifacts
from kvexp.errors import ConfigError
from kvexp.secrets import redact_uri, scrub

# A new sqlite store logs its schema creation, step by step, at INFO; stderr is for errors
for _name in ("alembic", "mlflow.store.db.utils"):
    logging.getLogger(_name).setLevel(logging.WARNING)
log = logging.getLogger("kvexp")

TAG = "kvexp."  # every kvexp tag starts with this
PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM = 6000  # MLflow's limit on a param value
HOST = socket.gethostname()
# MLflow's REST client retries a refused connection 7 times with exponential backoff (~4 minutes): the first
# contact with a server fails fast instead; later calls keep MLflow's retries, which ride out a server restart.
FIRST_CONTACT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                     "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# MLflow's cap on one search. Its default, 1000, would silently drop the newest runs of a bigger store: searches
# are ordered oldest first.
SEARCH_MAX = 50_000
CLAIM_SETTLE_S = 1.0  # a claim through a server: the least time a new run waits for rivals created with it (claim)

# SQLAlchemy databases (a sqlite file by default), a tracking server, Databricks, and MLflow's file store (a file://
# URI or a plain path, which MLflow >= 3.13 refuses itself unless MLFLOW_ALLOW_FILE_STORE=true: FACTS.md).
STORE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "file", "")

def _scrub_bytes(data: bytes) -> bytes:
    try:
        return scrub(data.decode("utf-8")).encode("utf-8")
    except UnicodeDecodeError:  # binary (a plot): kvexp never writes credentials into one
        return data


_WRITE_FIX = {  # errno -> what the user can do about a failed artifact write
    errno.ENOSPC: "free space there or point tracking.uri at another store",
    errno.EDQUOT: "free space there (a disk quota) or point tracking.uri at another store",
    errno.EACCES: "permission denied: make it writable for this user or point tracking.uri at another store",
    errno.EPERM: "permission denied: make it writable for this user or point tracking.uri at another store",
    errno.EROFS: "a read-only file system: point tracking.uri at a writable store",
}


def _write_atomic(dest: Path, data: bytes) -> None:
    """dest appears complete or not at all (kvexp.artifacts.write_bytes: a temp name beside it, synced, renamed);
    a process killed mid-write leaves a PARTIAL file (reap_stale removes it), never a truncated dest."""
    try:
        artifacts.write_bytes(dest, data)
    except OSError as e:
        raise OSError(e.errno, f"could not write artifact {dest.name} to {dest.parent} ({e.strerror or e}); "
                               f"{_WRITE_FIX.get(e.errno, 'point tracking.uri at another store')}") from e


@contextmanager
def _first_contact() -> Iterator[None]:
    """FIRST_CONTACT_ENV for the duration, unless the user set those variables themselves."""
    added = {k: v for k, v in FIRST_CONTACT_ENV.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _reason(exc: Exception) -> str:
    """The cause in a few words: the OS error under MLflow's and urllib3's wrappers ("Connection refused")."""
    text = scrub(str(exc))
    errno_text = re.search(r"\[Errno -?\d+\] ([^\"')]+)", text)
    if errno_text:
        return errno_text.group(1).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


def _local_dir(artifact_uri: str) -> Optional[Path]:
    """The directory behind a file:// (or plain path) artifact URI; None for a remote one (s3://, mlflow-artifacts:)."""
    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    return Path(artifact_uri) if parsed.scheme == "" else None


def default_uri(root: Path | None = None) -> str:
    root = (root or Path.cwd()) / "mlruns"
    return f"sqlite:///{root.resolve() / 'mlflow.db'}"


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"quant.kv_cache.dtype": "int8", ...}; lists as JSON."""
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for key, value in data.items():
            out |= flatten(value, f"{prefix}{key}.")
        return out
    text = json.dumps(data) if isinstance(data, (list, tuple)) else str(data)
    return {prefix[:-1]: text[:MAX_PARAM]}


class Tracker:
    def __init__(self, uri: Optional[str], experiment: str):
        self.uri = uri or default_uri()
        self.experiment = experiment
        self.local = self.uri.startswith("sqlite:///")
        self._client = None
        self._experiment_id: Optional[str] = None

    @property
    def shown_uri(self) -> str:
        """The URI to print or log: without its user:password@ part."""
        return redact_uri(self.uri)

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    @property
    def db_file(self) -> Optional[Path]:
        return Path(self.uri[len("sqlite:///"):]) if self.local else None

    @property
    def store_dir(self) -> Optional[Path]:
        return self.db_file.parent if self.local else None

    @classmethod
    def open_existing(cls, uri: Optional[str], experiment: str) -> Tracker:
        """A Tracker on a store and experiment that exist already: a reader (compare, ui, reproduce) must not create
        an empty store in the cwd, nor an experiment from a misspelt name."""
        tracker = cls(uri, experiment)
        if tracker.local and not tracker.db_file.is_file():
            raise ConfigError(f"tracking.uri={tracker.shown_uri}: no MLflow store there; run a sweep first "
                              "(python -m kvexp.run -m ...) or pass --tracking-uri")
        tracker._check_db()
        exp = tracker._find_experiment()
        if exp is None:
            raise ConfigError(f"experiment {experiment}: no such experiment in {tracker.shown_uri}; "
                              "pass --experiment")
        tracker._experiment_id = exp.experiment_id
        return tracker

    def prepare(self) -> str:
        """Create the store schema and the experiment if needed (once, under a lock); return the experiment id."""
        if self._experiment_id:
            return self._experiment_id
        if self.local:
            try:
                self.store_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"tracking.uri={self.shown_uri}: cannot create {self.store_dir} ({e.strerror}); "
                                  "point tracking.uri at a writable place") from e
            with self._lock():
                self._check_db()  # under the lock: a store being created by another process is empty for a moment
                self._experiment_id = self._get_or_create()
        else:
            self._experiment_id = self._get_or_create()
        return self._experiment_id

    def _lock(self) -> FileLock:
        """The store's lock (local stores): schema and experiment creation, and claims, happen under it."""
        return FileLock(str(self.store_dir / ".kvexp.lock"))

    def _check_db(self) -> None:
        """A 0-byte sqlite file is a store whose runs are gone (a failed copy, a truncation): MLflow would silently
        make it a new, empty store while the old runs' artifacts stay on disk."""
        if self.local and self.db_file.is_file() and self.db_file.stat().st_size == 0:
            raise ConfigError(f"tracking.uri={self.shown_uri}: the file is empty (0 bytes), not an MLflow store; "
                              "restore it from a copy, or delete it to start a new store there")

    def _check_location(self, exp) -> None:
        """A local store's experiment keeps its artifacts in its own directory: one elsewhere means this store was
        copied or moved from there, and its runs' artifacts would land in (or be read from) the original."""
        where = _local_dir(exp.artifact_location)
        if self.local and where is not None and not where.resolve().is_relative_to(self.store_dir.resolve()):
            raise ConfigError(f"tracking.uri={self.shown_uri}: experiment {self.experiment} keeps its artifacts in "
                              f"{where}, outside this store's directory {self.store_dir} (a copied or moved store); "
                              "use the store at its original place, or pass tracking.experiment=<a new name>")

    def _find_experiment(self):
        """The experiment, or None if the store has none of that name; a ConfigError if the store cannot be read."""
        scheme = urlparse(self.uri).scheme.split("+")[0]  # postgresql+psycopg2 -> postgresql
        if scheme not in STORE_SCHEMES:
            raise ConfigError(f"tracking.uri={self.shown_uri}: not an MLflow store kvexp supports; use "
                              "sqlite:///<abs path>.db, http(s)://host:port (tracking=server) or postgresql://...")
        try:
            with _first_contact():
                return self.client.get_experiment_by_name(self.experiment)
        except Exception as e:  # an unreachable server or unreadable store: one line, not a traceback
            fix = "start the server (README, \"Tracking server\") or fix tracking.uri" if scheme.startswith("http") \
                else "point tracking.uri at an MLflow store (default: sqlite:///<cwd>/mlruns/mlflow.db)"
            raise ConfigError(f"tracking.uri={self.shown_uri}: cannot open the MLflow store ({_reason(e)}); {fix}") \
                from e

    def _get_or_create(self) -> str:
        exp = self._find_experiment()
        if exp is not None:
            self._check_location(exp)
            return exp.experiment_id
        location = (self.store_dir / "artifacts" / self.experiment).as_uri() if self.local else None
        return self.client.create_experiment(self.experiment, artifact_location=location)

    # ---- runs ----
    def start_run(self, name: str, tags: dict[str, str], parent: Optional[str] = None) -> str:
        """A RUNNING run owned by this process (kvexp.host, kvexp.pid, kvexp.pid_start: what reap_stale checks)."""
        owner = {TAG + "host": HOST, TAG + "pid": str(os.getpid()),
                 TAG + "pid_start": repr(psutil.Process().create_time())}
        tags = {k: scrub(v) for k, v in tags.items()} | owner | ({PARENT_TAG: parent} if parent else {})
        return self.client.create_run(self.prepare(), tags=tags, run_name=name).info.run_id

    def claim(self, config_hash: str, name: str, tags: dict[str, str], parent: Optional[str] = None,
              force: bool = False) -> Claim:
        """A RUNNING run of this process for the job with config_hash, unless a run holds the hash already: a
        FINISHED one (unless force) or a RUNNING one of a live process (another sweep of the same command).
        Runs of the hash left RUNNING by a dead process are marked KILLED first.

        Atomic across processes. A local store: the look-up and the new run happen under the store's lock. A
        server, which has no lock: each process creates its run first, then the earliest holder wins (the same
        answer in every process, once runs created at about the same moment have all arrived: CLAIM_SETTLE_S) and
        the others back off (_back_off)."""
        tags = tags | {TAG + "config_hash": config_hash}
        if self.local:
            self.prepare()  # outside the lock: prepare() takes it too
            with self._lock():
                holder = self._holder(config_hash, force)
                return Claim(holder=holder) if holder else Claim(self.start_run(name, tags, parent))
        if not force and (holder := self.find_finished(config_hash)) is not None:
            return Claim(holder=holder)  # the common skip, without a run created and deleted for it
        started = time.monotonic()
        run_id = self.start_run(name, tags, parent)
        # A rival's run may carry an earlier start time (its client's clock) yet reach the server after this look-up:
        # look again once such a run has had time to arrive, as long as a few of this run's creation round trips.
        for settle in (0.0, max(CLAIM_SETTLE_S, 4 * (time.monotonic() - started))):
            time.sleep(settle)
            holder = self._holder(config_hash, force, mine=run_id)
            if holder.info.run_id != run_id:
                self._back_off(run_id, holder)
                return Claim(holder=holder)
        return Claim(run_id)

    def _holder(self, config_hash: str, force: bool, mine: Optional[str] = None):
        """The earliest run that holds config_hash (RUNNING in a live process, or FINISHED unless force), or None.
        Reaps the hash's stale RUNNING runs, other than mine, on the way."""
        runs = self.search([f"tags.`{TAG}config_hash` = '{config_hash}'"])
        reaped = self.reap_stale(r for r in runs if r.info.run_id != mine)
        for run, reason in reaped:
            log.warning("run %s (%s) was left RUNNING: marked KILLED (%s)", run.info.run_id, run.info.run_name, reason)
        dead = {run.info.run_id for run, _ in reaped}
        holders = [r for r in runs if r.info.run_id not in dead
                   and (r.info.status == "RUNNING" or r.info.status == "FINISHED" and not force)]
        return min(holders, key=lambda r: (r.info.start_time, r.info.run_id), default=None)

    def _back_off(self, run_id: str, holder) -> None:
        """End a run that lost its claim as a skip: tagged with the holder, KILLED, then deleted, so that no
        summary, search or later claim counts it."""
        self.set_tags(run_id, {TAG + "skipped": f"run {holder.info.run_id} holds its config hash"})
        self.end(run_id, "KILLED")
        self.client.delete_run(run_id)

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k[:250], scrub(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i:i + 1000])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, scrub(value))

    def log_artifact(self, run_id: str, path: Path, artifact_path: Optional[str] = None) -> None:
        """A file as <artifact_path>/<name>, or a directory's files under <artifact_path>/, with text scrubbed.
        A local store gets each file atomically (_write_atomic): MLflow copies a directory in place (copytree), so
        a crash mid-copy would leave a truncated file under its real name."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no artifact to log at {path}")
        files = {path.name: path} if path.is_file() else {
            p.relative_to(path).as_posix(): p for p in sorted(path.rglob("*")) if p.is_file()}
        root = _local_dir(self.client.get_run(run_id).info.artifact_uri)
        if root is not None:
            for rel, src in files.items():
                _write_atomic(root / (artifact_path or "") / rel, _scrub_bytes(src.read_bytes()))
            return
        with tempfile.TemporaryDirectory() as tmp:  # a remote store: upload scrubbed copies
            for rel, src in files.items():
                (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
                (Path(tmp) / rel).write_bytes(_scrub_bytes(src.read_bytes()))
            self.client.log_artifacts(run_id, tmp, artifact_path)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(text)
            self.log_artifact(run_id, path)

    def fail(self, run_id: str, exc: BaseException) -> None:
        """End the run FAILED with its error as the kvexp.error tag and error.txt. The status is always set: the
        traceback is best effort, since writing it fails the same way when the disk is full."""
        try:
            self.set_tags(run_id, {TAG + "error": f"{type(exc).__name__}: {exc}"[:5000]})
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            try:
                self.log_text(run_id, text, "error.txt")
            except OSError as e:
                log.warning("run %s: no error.txt (%s)", run_id, e)
        finally:
            self.end(run_id, "FAILED")

    def kill(self, run_id: str, reason: str) -> None:
        """End the run KILLED with why as the kvexp.killed_reason tag. The status is always set, as in fail()."""
        try:
            self.set_tags(run_id, {TAG + "killed_reason": reason})
        finally:
            self.end(run_id, "KILLED")

    def end(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status=status)

    def reap_stale(self, runs: Iterable) -> list[tuple[Any, str]]:
        """Mark KILLED those of runs that are RUNNING but whose process is gone, with a kvexp.killed_reason tag; return
        (run, reason) for each. Only runs started on this host are judged: other hosts' processes are not visible."""
        reaped = []
        for run in runs:
            reason = stale_reason(run.data.tags) if run.info.status == "RUNNING" else None
            if reason is None:
                continue
            self.kill(run.info.run_id, reason)
            root = _local_dir(run.info.artifact_uri)
            for partial in root.rglob(artifacts.PARTIAL + "*") if root and root.is_dir() else ():
                partial.unlink(missing_ok=True)
            reaped.append((run, reason))
        return reaped

    # ---- look-ups ----
    def search(self, filters: Iterable[str] = ()) -> list:
        query = " and ".join(filters)
        return self.client.search_runs([self.prepare()], filter_string=query, max_results=SEARCH_MAX,
                                       order_by=["attributes.start_time ASC"])

    def find_finished(self, config_hash: str):
        runs = self.search([f"tags.`{TAG}config_hash` = '{config_hash}'", "attributes.status = 'FINISHED'"])
        return runs[0] if runs else None

    def running(self, *filters: str) -> list:
        return self.search(["attributes.status = 'RUNNING'", *filters])

    def jobs(self, *filters: str) -> list:
        """The job runs matching the filters, oldest first: not a sweep's parent run. (MLflow cannot filter on a
        tag's absence: `tags.x != 'true'` skips runs without the tag, i.e. every job.)"""
        return [r for r in self.search(filters) if r.data.tags.get(TAG + "sweep") != "true"]

    def sweep_runs(self, sweep_id: str) -> list:
        """The job runs of one command (not the sweep's parent run)."""
        return self.jobs(f"tags.`{TAG}sweep_id` = '{sweep_id}'")

    def read_text(self, run_id: str, name: str) -> str:
        """The text of the run's artifact name (a path under its artifact root), with MLflow's download progress
        bar off: a sweep's closing table reads a small file per run and task, and each bar was a console line."""
        key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"  # read by MLflow at each download
        before, os.environ[key] = os.environ.get(key), "false"
        try:
            with tempfile.TemporaryDirectory() as tmp:
                return Path(self.client.download_artifacts(run_id, name, tmp)).read_text()
        finally:
            if before is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = before


@dataclass(frozen=True)
class Claim:
    """Tracker.claim's answer: run_id, this process's RUNNING run (run the job), or holder, the run that holds the
    config hash (skip the job)."""
    run_id: Optional[str] = None
    holder: Any = None

    def why(self) -> str:
        """Why the job is skipped, in a few words."""
        run, tags = self.holder.info, self.holder.data.tags
        config_hash = tags.get(TAG + "config_hash", "?")[:12]
        if run.status == "FINISHED":
            return f"run {run.run_id} already FINISHED with config hash {config_hash} (force=true re-runs it)"
        return (f"run {run.run_id} with config hash {config_hash} is RUNNING in process {tags.get(TAG + 'pid')} on "
                f"{tags.get(TAG + 'host')} (another sweep of this job)")


def stale_reason(tags: dict[str, str]) -> Optional[str]:
    """Why the process that started a run can no longer end it, or None if it may still be running (or ran on
    another host, or before kvexp recorded owners). This process counts as gone: it asks only between jobs."""
    host, pid, started = tags.get(TAG + "host"), tags.get(TAG + "pid"), tags.get(TAG + "pid_start")
    if host != HOST or not pid:
        return None
    owner = f"process {pid} on {host}"
    if int(pid) == os.getpid():
        return f"{owner} (this one) left its job without ending the run"
    try:
        created = psutil.Process(int(pid)).create_time()
    except psutil.NoSuchProcess:
        return f"{owner} is gone (killed or crashed)"
    if started and abs(created - float(started)) > 1:  # the pid now belongs to a newer process
        return f"{owner} is gone (its pid now belongs to another process)"
    return None


def gpu_tags(device: str) -> dict[str, str]:
    """Which GPU a run ran on, beside its kind (the kvexp.device tag, part of the config hash): its index on the
    host, as nvidia-smi and CUDA_VISIBLE_DEVICES name it (hydra/launcher=kvexp_gpus gives each worker one, which
    it sees as cuda:0), and its UUID. Not in the hash: any GPU of one kind gives the same run. None for the CPU."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return {}
    index = torch.cuda.current_device() if dev.index is None else dev.index
    visible = [e.strip() for e in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if e.strip()]
    return {TAG + "gpu_index": visible[index] if index < len(visible) else str(index),
            TAG + "gpu_uuid": f"GPU-{torch.cuda.get_device_properties(index).uuid}"}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
