"""Checks of command-line values shared by the subcommands: each raises
:class:`~distca.errors.UsageError` naming the flag, before any work starts."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from distca.errors import UsageError


def require_positive(args: argparse.Namespace, *names: str) -> None:
    """UsageError naming the first flag among ``names`` (argparse dests) whose value is below 1;
    None passes: a default the command derives later."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def require_tolerance(tolerance: float) -> None:
    """--tolerance ε as the planner takes it: finite and >= 0 (NaN fails both)."""
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise UsageError(f"--tolerance must be a finite value >= 0, got {tolerance}")


def output_file(flag: str, path: str):
    """``path`` as a Path, checked before any measurement runs so a typo costs nothing: it must
    not be a directory; missing parent directories are made (exit 2 if they cannot be)."""
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"{flag}: {out} is a directory; give a file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{flag}: cannot make the directory {out.parent}: {exc}") from None
    return out
