"""What the GPU paths share: the backends' availability probe (flash, flex), host-to-device
copies of task metadata, and compiling the elementwise steps around the kernel into one launch
on CUDA (core, flex)."""

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


def host_to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A CPU tensor on ``device``; to CUDA through pinned memory without blocking the host.

    A copy from pageable memory first waits for the stream to drain, which would stall the
    host in every attention call that copies task metadata and keep it from queueing the
    next nano-batch's kernels.
    """
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


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
