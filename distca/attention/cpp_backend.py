"""CPU backend on the C++ kernel in ``csrc/`` (flash-style tiles, one call per task list).

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` into
``build/extensions/<name>-<hash>/`` of the source checkout, where ``<hash>`` covers the sources,
the flags, the torch version and the host's CPU features (the build uses ``-march=native``), so
editing ``csrc/`` or moving the checkout to another CPU triggers a rebuild and an unchanged tree
loads the cached library. Primitives as in :mod:`distca.attention.torch_backend`; float32, bfloat16 and float16
(float32 accumulation), head dim up to 256.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
from pathlib import Path
from types import ModuleType

import torch

from .tasks import TaskList

DEVICES = ("cpu",)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256

_ROOT = Path(__file__).resolve().parents[2]
_SOURCES = ("csrc/attention_cpu.cpp",)
_HEADERS = ("csrc/huge_pages.h", "csrc/tile_math.h", "csrc/tile_packing.h", "csrc/varlen_tasks.h")
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]
_LDFLAGS = ["-fopenmp"]


def has_compiler() -> bool:
    """Whether a C++ compiler is on PATH (``$CXX`` or ``c++``), so that a build can be tried."""
    return shutil.which(os.environ.get("CXX", "c++")) is not None


def _cpu_features() -> str:
    """The host's CPU model and feature flags: what ``-march=native`` compiles for."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:  # not Linux: the processor string is the best we have
        return f"{platform.machine()} {platform.processor()}"


def compile_flags() -> str:
    """The compiler flags the extension is built with (for benchmark reports)."""
    return " ".join(_CFLAGS)


def build_directory() -> Path:
    """Where the extension for the current sources, flags and CPU is (or will be) built."""
    key = " ".join(_CFLAGS + _LDFLAGS + [torch.__version__, _cpu_features()])
    digest = hashlib.sha256(key.encode())
    for rel in _SOURCES + _HEADERS:
        digest.update((_ROOT / rel).read_bytes())
    return _ROOT / "build" / "extensions" / f"distca_attention_cpu-{digest.hexdigest()[:16]}"


@functools.cache
def _load() -> tuple[ModuleType | None, str]:
    """(extension, "") or (None, why it cannot be used); built at most once per process."""
    missing = [rel for rel in _SOURCES + _HEADERS if not (_ROOT / rel).is_file()]
    if missing:
        return None, f"C++ sources not found: {', '.join(missing)} under {_ROOT}"
    if not has_compiler():
        return None, f"no C++ compiler found (looked for {os.environ.get('CXX', 'c++')!r})"
    from torch.utils.cpp_extension import load

    build_dir = build_directory()
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        module = load(name="distca_attention_cpu", sources=[str(_ROOT / s) for s in _SOURCES],
                      extra_cflags=_CFLAGS, extra_ldflags=_LDFLAGS,
                      build_directory=str(build_dir), verbose=False)
    except (RuntimeError, OSError, ImportError) as exc:  # compiler or linker failure
        return None, f"building the C++ extension in {build_dir} failed: {exc}"
    return module, ""


def is_available() -> bool:
    return _load()[0] is not None


def unavailable_reason() -> str:
    return _load()[1]


def _check(q: torch.Tensor) -> None:
    if q.dtype not in DTYPES:
        raise ValueError(f"the cpp attention backend supports {DTYPES}, got {q.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"the cpp attention backend supports head dim <= {MAX_HEAD_DIM}, "
                         f"got {q.shape[-1]}")


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, H, D) x (N, H, D) -> (N, H) float32 dot products, without an (N, H, D) temporary."""
    n, h, d = a.shape
    a, b = a.float().reshape(n * h, 1, d), b.float().reshape(n * h, d, 1)
    return torch.bmm(a, b).view(n, h)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tasks: TaskList,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check(q)
    return tuple(_load()[0].forward(q, k, v, tasks.q_ranges, tasks.kv_ranges, tasks.causal,
                                    scale))


def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             out: torch.Tensor, lse: torch.Tensor, tasks: TaskList, scale: float,
             dlse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(q)
    delta = row_dot(dout, out)
    if dlse is not None:
        delta = delta - dlse.float()
    return tuple(_load()[0].backward(dout, q, k, v, lse, delta, tasks.q_ranges,
                                     tasks.kv_ranges, tasks.causal, scale))
