"""What the C++ CPU kernel is built from: sources, flags and their digest.

Stdlib only: ``setup.py`` loads this file by path (before distca is installed) to build the
extension ``distca._C`` at install time, and :mod:`distca.attention.cpp_backend` uses the same
digest to notice a source checkout whose ``csrc/`` changed after the kernel was built.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

EXTENSION = "distca._C"
SOURCES = ("csrc/attention_cpu.cpp",)
HEADERS = ("csrc/huge_pages.h", "csrc/tile_math.h", "csrc/tile_packing.h", "csrc/varlen_tasks.h")
# -march=native: the kernel is built on the machine that runs it (pip install / make setup)
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno")
LDFLAGS = ("-fopenmp",)


def sources_digest(root: Path) -> str:
    """A short hash of the kernel's sources and flags under the checkout ``root``."""
    digest = hashlib.sha256(" ".join(CFLAGS + LDFLAGS).encode())
    for rel in SOURCES + HEADERS:
        digest.update((root / rel).read_bytes())
    return digest.hexdigest()[:16]
