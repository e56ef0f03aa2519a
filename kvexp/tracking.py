"""The one module that talks to MLflow: the store, runs, params, tags, metrics, artifacts, look-ups by hash.

Default store: sqlite:///<cwd>/mlruns/mlflow.db with artifacts under <cwd>/mlruns/artifacts (absolute URIs,
FACTS.md). The schema and the experiment are created once, up front, under a file lock: parallel jobs
racing on first-time sqlite creation corrupt it.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import traceback
from pathlib import Path
from typing import Any, Iterable, Optional

from filelock import FileLock

from kvexp.errors import ConfigError

logging.getLogger("alembic").setLevel(logging.WARNING)  # sqlite schema migrations log every step at INFO

TAG = "kvexp."  # every kvexp tag starts with this
PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM = 6000  # MLflow's limit on a param value


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
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    @property
    def store_dir(self) -> Optional[Path]:
        return Path(self.uri[len("sqlite:///"):]).parent if self.local else None

    def prepare(self) -> str:
        """Create the store schema and the experiment if needed (once, under a lock); return the experiment id."""
        if self._experiment_id:
            return self._experiment_id
        if self.local:
            self.store_dir.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.store_dir / ".kvexp.lock")):
                self._experiment_id = self._get_or_create()
        else:
            self._experiment_id = self._get_or_create()
        return self._experiment_id

    def _get_or_create(self) -> str:
        try:
            exp = self.client.get_experiment_by_name(self.experiment)
        except Exception as e:  # an unreachable server or unreadable store: one line, not a traceback
            raise ConfigError(f"tracking.uri={self.uri}: cannot reach the MLflow store ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e
        if exp is not None:
            return exp.experiment_id
        location = (self.store_dir / "artifacts" / self.experiment).as_uri() if self.local else None
        return self.client.create_experiment(self.experiment, artifact_location=location)

    # ---- runs ----
    def start_run(self, name: str, tags: dict[str, str], parent: Optional[str] = None) -> str:
        tags = dict(tags) | ({PARENT_TAG: parent} if parent else {})
        return self.client.create_run(self.prepare(), tags=tags, run_name=name).info.run_id

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k[:250], v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i:i + 1000])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def log_artifact(self, run_id: str, path: Path, artifact_path: Optional[str] = None) -> None:
        if Path(path).is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(text)
            self.log_artifact(run_id, path)

    def log_failure(self, run_id: str, exc: BaseException) -> None:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.log_text(run_id, text, "error.txt")
        self.set_tags(run_id, {TAG + "error": f"{type(exc).__name__}: {exc}"[:5000]})

    def end(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status=status)

    # ---- look-ups ----
    def search(self, filters: Iterable[str] = (), max_results: int = 1000) -> list:
        query = " and ".join(filters)
        return self.client.search_runs([self.prepare()], filter_string=query, max_results=max_results,
                                       order_by=["attributes.start_time ASC"])

    def find_finished(self, config_hash: str):
        runs = self.search([f"tags.`{TAG}config_hash` = '{config_hash}'", "attributes.status = 'FINISHED'"])
        return runs[0] if runs else None

    def sweep_runs(self, sweep_id: str) -> list:
        """The job runs of one command (not the sweep's parent run)."""
        return [r for r in self.search([f"tags.`{TAG}sweep_id` = '{sweep_id}'"])
                if r.data.tags.get(TAG + "sweep") != "true"]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("kvexp", "torch", "transformers", "mlflow", "lm-eval", "nvidia-modelopt", "triton", "tensorrt-llm",
                 "hydra-core"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def device_name() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
