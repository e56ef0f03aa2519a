"""Triton kernels for the decode hot path: split-KV attention over dense/int8/fp8/int4 caches and the fused
quantize-and-store of new tokens (decode and prefill). Every kernel has a pure-PyTorch reference beside it with the same
signature, which is also the CPU path.

Triton is optional: without it the references still import (the kernel modules decorate their kernels
with the stand-ins below) and a kernel call fails with one line saying how to get it.
"""
from __future__ import annotations

import importlib.util

import torch


def triton_available() -> bool:
    """True when the Triton kernels can run here: triton is installed and there is a CUDA device."""
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


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
