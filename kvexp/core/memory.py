"""Peak memory of one job, not of the process: Hydra's basic launcher runs every job of a sweep in one process.

CUDA: the caching allocator's peak on the engine's device, reset when the job starts. CPU: the kernel's high-water
mark of resident memory (VmHWM), reset by writing 5 to /proc/self/clear_refs (Linux >= 4.0): getrusage's
ru_maxrss is the lifetime peak, so a job after one that allocated 2 GiB would report 2 GiB more than it used.

Capacity (kv_capacity): the KV-cache tokens that fit in what the process could hold on the device (budget_bytes)
once the weights and the runtime's working memory at the run's batch and context are taken out.
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


# ---- capacity: how much KV cache the memory left after the weights and the runtime holds ----
_MEMINFO = Path("/proc/meminfo")
_CGROUP = Path("/sys/fs/cgroup")  # inside a container, the container's own cgroup is mounted here
_NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _kib_field(path: Path, name: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cgroup_headroom() -> int | None:
    """Bytes the process's cgroup may still allocate (its limit less its usage), or None without a limit."""
    for limit, usage in (("memory.max", "memory.current"),  # cgroup v2
                         ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):  # v1
        cap, used = _read_int(_CGROUP / limit), _read_int(_CGROUP / usage)
        if cap is not None and cap < _NO_LIMIT and used is not None:
            return max(0, cap - used)
    return None


def budget_bytes(device: torch.device) -> int:
    """Bytes this process could hold on device in all: what it holds now plus what it could still get.

    CUDA: the driver's free memory plus what torch's caching allocator has reserved (the CUDA context and other
    processes are not ours to use). CPU: the resident set plus MemAvailable, or plus the cgroup's headroom where
    a memory limit is tighter than the machine.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device))
    available = _kib_field(_MEMINFO, "MemAvailable")
    headroom = cgroup_headroom()
    if headroom is not None:
        available = headroom if available is None else min(available, headroom)
    return int((available or 0) + (_kib_field(_STATUS, "VmRSS") or 0))


def kv_capacity(budget: int, weight_bytes: int, working_bytes: int, kv_bytes_per_token: float,
                seq_tokens: int) -> tuple[int, int]:
    """(tokens of KV cache that fit, sequences of seq_tokens that fit) in budget less the weights and the
    runtime's working memory. The working memory is the one measured at the run's batch: activations that grow
    with the batch make max_batch an upper bound."""
    tokens = max(0, int((budget - weight_bytes - working_bytes) // kv_bytes_per_token))
    return tokens, tokens // seq_tokens
