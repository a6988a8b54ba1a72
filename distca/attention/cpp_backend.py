"""CPU backend on the C++ kernel in ``csrc/`` (flash-style tiles, one call per task list).

The kernel is the extension ``distca._C``, built once when distca is installed (``setup.py``;
``make setup`` in a checkout), never on first use: a run does not stall compiling, and a
changed ``PATH`` or a copied working directory does not rebuild it. In a source checkout whose
``csrc/`` changed after that build, the stale kernel is refused with a message saying how to
rebuild. Primitives as in :mod:`distca.attention.torch_backend`; float32, bfloat16 and float16
(float32 accumulation), head dim up to 256.
"""

from __future__ import annotations

import functools
import importlib
import os
import shutil
from pathlib import Path
from types import ModuleType

import torch

from .kernel_source import CFLAGS, EXTENSION, HEADERS, SOURCES, sources_digest
from .tasks import TaskList

DEVICES = ("cpu",)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256

_ROOT = Path(__file__).resolve().parents[2]  # the checkout, when running from one
REBUILD = "run `make setup` (or `pip install --no-build-isolation -e .`) to rebuild it"


def has_compiler() -> bool:
    """Whether a C++ compiler is on PATH (``$CXX`` or ``c++``): whether the install built one."""
    return shutil.which(os.environ.get("CXX", "c++")) is not None


def compile_flags() -> str:
    """The compiler flags the extension is built with (for benchmark reports)."""
    return " ".join(CFLAGS)


def _checkout_digest() -> str | None:
    """The digest of ``csrc/`` when running from a source checkout, else None (an install)."""
    if not all((_ROOT / rel).is_file() for rel in SOURCES + HEADERS):
        return None
    return sources_digest(_ROOT)


def _installed_kernel() -> ModuleType | None:
    """The kernel of the installed distca, for a copy of the sources that has none: ``ray job
    submit --working-dir`` uploads the checkout without its git-ignored files, the built
    kernel among them, and the job imports distca from that copy."""
    import importlib.util
    import json
    from importlib import metadata

    try:
        dist = metadata.distribution("distca")
    except metadata.PackageNotFoundError:
        return None
    folders = [Path(dist.locate_file("distca"))]  # a regular install
    url = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
    if url.startswith("file://"):  # an editable install: the kernel sits in its checkout
        folders.append(Path(url.removeprefix("file://")) / "distca")
    built = next((so for folder in folders for so in sorted(folder.glob("_C.*.so"))), None)
    if built is None:
        return None
    spec = importlib.util.spec_from_file_location(EXTENSION, built)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def _load() -> tuple[ModuleType | None, str]:
    """(extension, "") or (None, why it cannot be used); imported at most once per process."""
    try:
        module = importlib.import_module(EXTENSION)
    except ImportError:
        module = _installed_kernel()
    if module is None:
        if not has_compiler():
            return None, f"no C++ compiler found (looked for {os.environ.get('CXX', 'c++')!r})"
        return None, f"the C++ kernel {EXTENSION} is not built; {REBUILD}"
    current = _checkout_digest()
    if current is not None and current != module.SOURCES_DIGEST:
        return None, (f"the C++ kernel {module.__file__} was built from other csrc/ sources "
                      f"than {_ROOT / 'csrc'}; {REBUILD}")
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
