"""Peak memory of one job, not of the process: Hydra's basic launcher runs every job of a sweep in one process.

CUDA: the caching allocator's peak on the engine's device, reset when the job starts. CPU: the kernel's high-water
mark of resident memory (VmHWM), reset by writing 5 to /proc/self/clear_refs (Linux >= 4.0): getrusage's
ru_maxrss is the lifetime peak, so a job after one that allocated 2 GiB would report 2 GiB more than it used.
"""
from __future__ import annotations

import logging
import resource
from pathlib import Path

import torch

log = logging.getLogger("kvexp")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")
_warned = False


def reset_peak(device: torch.device) -> None:
    """Start counting the peak afresh for what runs on device from now on."""
    global _warned
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        if not _warned:
            log.warning("cannot reset the peak resident memory here (no writable /proc/self/clear_refs): "
                        "mem.peak_bytes on the CPU is the process's lifetime peak")
            _warned = True


def peak_bytes(device: torch.device) -> int:
    """Bytes at the peak since the last reset_peak(device): allocated tensors (CUDA) or resident memory (CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kB
