"""Triton kernels for the decode hot path: split-KV attention over dense/int8/fp8/int4 caches and the fused
quantize-and-store of new tokens (decode and prefill). Every kernel has a pure-PyTorch reference beside it with the same
signature, which is also the CPU path.

On sm90+ GPUs the decode step's kernels (attention, cache writes, the GEMVs, argmax) launch chained by programmatic
dependent launch (pdl below; KVEXP_PDL=0 turns it off); quantize_rows and dequantize, prefill-sized, launch plainly.

Triton is optional: without it the references still import (the kernel modules decorate their kernels
with the stand-ins below) and a kernel call fails with one line saying how to get it.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch

PDL_CAPABILITY = (9, 0)  # griddepcontrol (programmatic dependent launch): Hopper and later
_pdl = os.environ.get("KVEXP_PDL", "1") != "0"


def triton_available() -> bool:
    """True when the Triton kernels can run here: triton is installed and there is a CUDA device."""
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


@contextlib.contextmanager
def pdl_switch(enabled: bool):
    """Programmatic dependent launch on or off for the kernels launched inside, then back to what it was (on by
    default where the GPU has it; KVEXP_PDL=0 turns it off at start). For side-by-side measurements
    (scripts/bench_decode.py --pdl): a graph keeps the launches it was captured with. torch.compile's kernels
    (kvexp.core.fused) never launch with PDL."""
    global _pdl
    before, _pdl = _pdl, enabled
    try:
        yield
    finally:
        _pdl = before


def pdl(tensor: torch.Tensor) -> bool:
    """Whether a decode kernel over `tensor` launches with programmatic dependent launch (PDL).

    In a CUDA graph each kernel otherwise starts only once its predecessor has drained, and at batch 1 a ~1B model's
    step is ~130 kernels of 2-15 us, so the drain, launch and ramp of each cost a share of the step that grows as the
    kernels get faster. Under PDL every program of a kernel first waits for the kernel before to finish
    (ptx.wait_for_producer), then lets the next kernel launch: the next one's launch and ramp overlap this one's
    work and tail, and no load moves ahead of the data it reads, so the result is the same. (Prefetching weights
    into the L2 before the wait, the other half of the idea, measured slower on the H200: docs/benchmarks.md.)
    CUDA on sm90+ with a triton that has griddepcontrol (3.3+); the interpreter runs no PTX."""
    return (_pdl and tensor.is_cuda and torch.cuda.get_device_capability(tensor.device) >= PDL_CAPABILITY
            and _triton_has_pdl())


@functools.lru_cache(maxsize=None)
def _triton_has_pdl() -> bool:
    from kvexp.core.kernels import ptx

    return ptx.gdc_wait is not None


def require_triton(triton_module: object, tensor: torch.Tensor, kernel: object) -> None:
    """Raise one actionable line unless `kernel` can launch on `tensor`'s device.

    CPU tensors are accepted only by kernels that Triton's interpreter built (TRITON_INTERPRET=1 set
    before the kernel module was imported), which is how the tests exercise the kernels on CPU.
    """
    if triton_module is _MissingTriton:
        raise RuntimeError("the kvexp Triton kernels need triton: `pip install triton` (CUDA builds of torch ship it)")
    if not tensor.is_cuda and type(kernel).__name__ != "InterpretedFunction":
        raise ValueError(f"Triton kernels run on CUDA tensors, got {tensor.device}; use the *_ref function on CPU "
                         "(or import the kernels with TRITON_INTERPRET=1 set)")


class _MissingTriton:
    """Stands in for both `triton` and `triton.language` when triton is not installed: `@triton.jit`
    returns the plain function and `tl.constexpr` annotations (and module constants wrapped in it) evaluate, so
    the module imports."""

    class constexpr:
        def __init__(self, value=None):
            self.value = value

    @staticmethod
    def jit(fn):
        return fn
