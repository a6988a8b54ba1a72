"""Availability probe shared by the GPU backends (flash, flex)."""

from __future__ import annotations

import importlib

import torch


def missing_reason(module: str, when_missing: str) -> str | None:
    """``None`` when a CUDA device is present and ``module`` imports; otherwise why not."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        importlib.import_module(module)
    except ImportError:
        return when_missing
    return None
