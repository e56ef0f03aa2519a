"""hydra/launcher=kvexp_gpus: a sweep's jobs in parallel, one per GPU of this machine, each alone on its GPU.

Each job runs in a fresh worker process started with CUDA_VISIBLE_DEVICES naming one GPU, so that its kernels,
CUDA graphs and memory statistics see that device alone (as cuda:0) and its memory goes back to the driver when
it exits. The GPUs are a pool of slots: a job takes a free one and gives it back when its worker exits, finished or
dead (a signal, the OOM killer, a crash). A dead worker is reported at once and the other jobs go on; when every
job has run the command exits 1, and kvexp.run marks the dead worker's run KILLED. The Hydra plugin
(hydra_plugins/kvexp_launcher) calls launch(); preflight calls check() before anything runs.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

from kvexp.errors import ConfigError

log = logging.getLogger("kvexp")
TARGET = "hydra_plugins.kvexp_launcher.gpu_launcher.GpuLauncher"  # conf/hydra/launcher/kvexp_gpus.yaml's _target_
POLL_S = 0.2  # how often the sweep looks for a worker that has exited
STOP_GRACE_S = 30  # Ctrl-C: how long a worker may take to mark its run KILLED before it is killed


def visible_gpus() -> list[str]:
    """The GPUs this process can hand out, named as CUDA_VISIBLE_DEVICES names them: its entries (as many as CUDA
    finds devices: it stops at the first invalid one), else 0..N-1."""
    import torch

    count = torch.cuda.device_count()
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [e.strip() for e in env.split(",")][:count] if env is not None else [str(i) for i in range(count)]


def slots(gpus: Optional[Sequence], n_jobs: Optional[int]) -> list[str]:
    """The GPUs one sweep hands out, one job on each at a time: hydra.launcher.gpus (default: every visible GPU),
    the first hydra.launcher.n_jobs of them (default: all)."""
    visible = visible_gpus()
    if not visible:
        raise ConfigError("hydra/launcher=kvexp_gpus: no CUDA GPU is visible here (CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); run on a GPU machine, or use "
                          "hydra/launcher=kvexp_joblib for CPU jobs in parallel")
    if gpus is None:
        chosen = visible
    elif isinstance(gpus, (str, int)):
        raise ConfigError(f"hydra.launcher.gpus={gpus}: a list of GPUs, e.g. hydra.launcher.gpus=[0,2]")
    else:
        chosen = [str(g) for g in gpus]
        named = ",".join(chosen)
        if unknown := [g for g in chosen if g not in visible]:
            raise ConfigError(f"hydra.launcher.gpus=[{named}]: GPU {unknown[0]} is not visible here; choose among "
                              f"{', '.join(visible)} (CUDA's numbering, or CUDA_VISIBLE_DEVICES's entries)")
        if len(set(chosen)) < len(chosen) or not chosen:
            raise ConfigError(f"hydra.launcher.gpus=[{named}]: name one GPU or more, each once (each job gets a GPU "
                              "of its own)")
    if n_jobs is None:
        return chosen
    if not isinstance(n_jobs, int) or not 1 <= n_jobs <= len(chosen):
        raise ConfigError(f"hydra.launcher.n_jobs={n_jobs}: between 1 and the {len(chosen)} GPU(s) it may use "
                          f"({', '.join(chosen)}), since each job needs a GPU of its own; leave it unset for one "
                          "job per GPU")
    return chosen[:n_jobs]


def check(launcher_cfg: Any, configs: Sequence) -> None:
    """Refuse, before anything runs, a sweep that kvexp_gpus cannot place: no GPU, a GPU list or n_jobs it cannot
    honour, or a job whose engine.device contradicts it. Inside a worker the only visible GPU is cuda:0, whichever
    it is on the host, so engine.device=cuda:N cannot mean the GPU the user named: the launcher picks with
    hydra.launcher.gpus instead. No-op for other launchers."""
    if launcher_cfg is None or launcher_cfg.get("_target_") != TARGET:
        return
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher

    if TARGET not in {f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Launcher)}:
        raise ConfigError("hydra/launcher=kvexp_gpus: Hydra does not find its plugin (hydra_plugins/kvexp_launcher, "
                          "new in this kvexp); install kvexp again (pip install -e .) so that it is installed too")
    slots(launcher_cfg.get("gpus"), launcher_cfg.get("n_jobs"))
    for cfg in configs:
        device = str(cfg.engine.get("device", "auto"))
        if device.startswith("cuda:"):
            raise ConfigError(f"engine.device={device}: hydra/launcher=kvexp_gpus gives each job a GPU of its own; "
                              f"leave engine.device=auto and choose the GPUs with hydra.launcher.gpus=[{device[5:]}], "
                              f"or pin a run with engine.device={device} under another launcher")
        if device not in ("auto", "cuda"):
            raise ConfigError(f"engine.device={device}: hydra/launcher=kvexp_gpus runs each job on a GPU; for "
                              "CPU jobs in parallel use hydra/launcher=kvexp_joblib")


# ---- the pool ----
class Worker(Protocol):  # subprocess.Popen's part that the pool uses
    pid: int

    def poll(self) -> Optional[int]: ...
    def send_signal(self, sig: int) -> None: ...
    def kill(self) -> None: ...
    def wait(self) -> int: ...


@dataclass(frozen=True)
class Ended:
    job: int  # the job's position in the list
    gpu: str
    pid: int
    code: int  # the worker's exit status; negative: the signal that killed it


def schedule(jobs: int, gpus: Sequence[str], start: Callable[[int, str], Worker],
             poll_s: float = POLL_S) -> Iterator[Ended]:
    """Run jobs 0..jobs-1 as GPUs free up, in order, one per GPU at a time (start(job, gpu) starts its worker);
    yield each as its worker exits. A worker that exits, dead or not, gives its GPU back to the pool. Workers
    still running when this stops early (Ctrl-C) are stopped (stop())."""
    free, pending, running = deque(gpus), deque(range(jobs)), {}
    try:
        while pending or running:
            while pending and free:
                gpu = free.popleft()
                job = pending.popleft()
                running[gpu] = (job, start(job, gpu))
            time.sleep(poll_s)
            for gpu, (job, worker) in list(running.items()):
                if (code := worker.poll()) is not None:
                    del running[gpu]
                    free.append(gpu)
                    yield Ended(job, gpu, worker.pid, code)
    finally:
        stop([worker for _, worker in running.values()])


def stop(workers: list[Worker], grace_s: float = STOP_GRACE_S) -> None:
    """Let each worker mark its run KILLED, then kill it; return once all are gone (a zombie would pass for a live
    owner of its run, which kvexp.run then could not mark KILLED). Workers in the terminal's process group got
    Ctrl-C's SIGINT already; those still alive a moment later (the sweep signalled alone: kill -INT) get one now."""
    def wait(seconds: float) -> None:
        end = time.monotonic() + seconds
        while any(w.poll() is None for w in workers) and time.monotonic() < end:
            time.sleep(0.05)

    wait(1.0)
    for w in workers:
        if w.poll() is None:
            w.send_signal(signal.SIGINT)
    wait(grace_s)
    for w in workers:
        if w.poll() is None:
            w.kill()
            w.wait()


def died(ended: Ended, job: str) -> str:
    """One line: the job, its worker and GPU, how the worker ended."""
    if ended.code < 0:
        name = signal.Signals(-ended.code).name
        how = f"was killed by {name}" + (" (as the kernel's OOM killer does)" if name == "SIGKILL" else "")
    else:
        how = f"exited with code {ended.code} (its traceback is above)"
    return (f"{job}: its worker process {ended.pid} on GPU {ended.gpu} {how}; GPU {ended.gpu} went back to the "
            "pool and the other jobs went on")


class WorkersDied(SystemExit):
    """Ends the command with exit 1 once every job has run, as Hydra ends it for a job process that died, without
    Hydra's traceback: the lines that say which workers died are printed already. kvexp.run then reports."""

    def __init__(self) -> None:
        super().__init__(1)


# ---- Hydra's side ----
def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list:
    """Hydra's Launcher.launch for the GpuLauncher plugin: each job in a worker process of its own (work())."""
    import cloudpickle
    from hydra.core.singleton import Singleton
    from hydra.core.utils import configure_log, filter_overrides, setup_globals

    setup_globals()
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    Path(str(launcher.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    gpus = slots(launcher.gpus, launcher.n_jobs)
    log.info("kvexp_gpus: %d job(s) on GPU(s) %s, one job per GPU at a time", len(job_overrides), ", ".join(gpus))
    state = Singleton.get_state()
    results, dead = {}, 0

    def name(job: int) -> str:
        return f"job {initial_job_idx + job + 1}/{initial_job_idx + len(job_overrides)} " \
               f"({' '.join(filter_overrides(job_overrides[job]))})"

    with tempfile.TemporaryDirectory(prefix="kvexp-jobs-") as tmp:
        def start(job: int, gpu: str) -> subprocess.Popen:
            idx = initial_job_idx + job
            payload = (idx, job_overrides[job], launcher.hydra_context, launcher.config, launcher.task_function, state)
            (Path(tmp) / f"{idx}.job").write_bytes(cloudpickle.dumps(payload))
            log.info("%s on GPU %s", name(job), gpu)
            # The device is chosen before the interpreter starts: nothing in the worker can initialize CUDA first
            return subprocess.Popen([sys.executable, "-m", "kvexp.launcher", tmp, str(idx)],
                                    env=os.environ | {"CUDA_VISIBLE_DEVICES": gpu})

        for ended in schedule(len(job_overrides), gpus, start):
            result = Path(tmp) / f"{initial_job_idx + ended.job}.ret"
            if ended.code == 0 and result.is_file():
                results[ended.job] = cloudpickle.loads(result.read_bytes())
            else:
                dead += 1
                print(f"kvexp: error: {died(ended, name(ended.job))}", file=sys.stderr)
    if dead:
        raise WorkersDied()
    return [results[job] for job in range(len(job_overrides))]


def work(tmp: Path, idx: str) -> int:
    """A worker: run job idx's payload (tmp/<idx>.job) the way Hydra's joblib launcher runs a job in its workers,
    write its JobReturn to tmp/<idx>.ret."""
    import cloudpickle
    from hydra.core.utils import JobStatus
    from hydra_plugins.hydra_joblib_launcher._core import execute_job

    try:
        ret = execute_job(*cloudpickle.loads((tmp / f"{idx}.job").read_bytes()))
    except KeyboardInterrupt:  # the job has marked its run KILLED
        return 130
    if ret.status == JobStatus.FAILED:  # an exception may not survive pickling; its message does
        ret.return_value = RuntimeError(f"{type(ret._return_value).__name__}: {ret._return_value}")
    (tmp / f"{idx}.ret").write_bytes(cloudpickle.dumps(ret))
    return 0


if __name__ == "__main__":
    sys.exit(work(Path(sys.argv[1]), sys.argv[2]))
