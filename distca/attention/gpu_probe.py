"""What the GPU paths share: the backends' availability probe (flash, flex), and compiling the
elementwise steps around the kernel into one launch on CUDA (core, flex)."""

from __future__ import annotations

import functools
import importlib

import torch


@functools.cache
def missing_reason(module: str, when_missing: str) -> str | None:
    """``None`` when a CUDA device is present and ``module`` imports; otherwise why not.

    Cached: it is asked on every attention call and ``torch.cuda.is_available`` is not free.
    """
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        importlib.import_module(module)
    except ImportError:
        return when_missing
    return None


def fused_on_cuda(fn):
    """``fn`` compiled (one kernel per step instead of one per op) for CUDA tensors, eager else.

    For the elementwise steps around the attention kernel: at a few milliseconds per call,
    launching their ~10 ops each one by one costs more than 10% of the step.
    """
    compiled = None

    @functools.wraps(fn)
    def call(*args):
        nonlocal compiled
        if not args[0].is_cuda:
            return fn(*args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=None)
        return compiled(*args)

    return call
