"""The Hydra plugin behind hydra/launcher=kvexp_gpus (conf/hydra/launcher/kvexp_gpus.yaml): one job per GPU.

Hydra imports every module under hydra_plugins when it starts, so this one imports nothing heavy; the work is
kvexp.launcher's.
"""
from typing import Any, Optional, Sequence

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class GpuLauncher(Launcher):
    def __init__(self, n_jobs: Optional[int] = None, gpus: Optional[Sequence[Any]] = None) -> None:
        self.n_jobs, self.gpus = n_jobs, gpus
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.task_function, self.hydra_context = config, task_function, hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from kvexp import launcher

        return launcher.launch(self, job_overrides, initial_job_idx)
