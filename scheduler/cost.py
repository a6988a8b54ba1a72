"""Cost model: bytes a task moves (from the model shape) and an optional measured throughput table.

Attention work is counted in *score pairs* (design §2). Bytes follow the dispatch of design §5:
a query token placed away from its worker sends q in and gets out plus the fp32 log-sum-exp back;
a key/value token sends k and v in, once per (source, destination) pair.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LSE_BYTES = 4  # the row log-sum-exp travels back in fp32


def attention_flops_per_pair(heads: int, head_dim: int) -> float:
    """Forward + backward FLOPs per score pair and layer: QKᵀ and PV forward (4·heads·head_dim),
    the backward about 2.5× that."""
    return 3.5 * 4 * heads * head_dim


@dataclass(frozen=True)
class ModelShape:
    """Attention shape of one layer: query heads, key/value heads, head dim, bytes per element."""

    h_q: int = 32
    h_kv: int = 8
    head_dim: int = 128
    bytes_per_elem: int = 2

    def __post_init__(self) -> None:
        for name in ("h_q", "h_kv", "head_dim", "bytes_per_elem"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelShape.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def q_bytes(self) -> int:
        """Bytes per remote query token: q in, out back, lse back."""
        return 2 * self.h_q * self.head_dim * self.bytes_per_elem + self.h_q * LSE_BYTES

    @property
    def kv_bytes(self) -> int:
        """Bytes per remote key/value token: k and v in."""
        return 2 * self.h_kv * self.head_dim * self.bytes_per_elem


class CostTable:
    """Measured attention throughput (score pairs per second) by task shape.

    Built from a CSV with columns ``q_len,kv_len,pairs_per_s`` (the profiling output; an optional
    ``mask`` column of ``causal``/``full`` selects the rows of one mask). Lookups interpolate
    bilinearly in log2(q_len), log2(kv_len) and clamp outside the measured grid.
    """

    def __init__(self, q_lens: np.ndarray, kv_lens: np.ndarray, pairs_per_s: np.ndarray):
        """q_lens (A,), kv_lens (B,) increasing; pairs_per_s (A, B) > 0."""
        self.q_lens = np.asarray(q_lens, dtype=np.float64)
        self.kv_lens = np.asarray(kv_lens, dtype=np.float64)
        self.pairs_per_s = np.asarray(pairs_per_s, dtype=np.float64)
        if self.pairs_per_s.shape != (self.q_lens.size, self.kv_lens.size):
            raise ValueError("pairs_per_s must be (len(q_lens), len(kv_lens))")
        if not (self.pairs_per_s > 0).all():
            raise ValueError("throughputs must be > 0")

    @classmethod
    def from_csv(cls, path: str | Path, mask: str = "causal") -> CostTable:
        """The table of one ``mask`` (causal: the shape of CA-tasks from causal documents)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: no such cost table")
        with path.open(newline="") as f:
            try:
                points, fields = _read_points(csv.DictReader(f), path, mask)
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}: not a text CSV ({exc})") from None
        if not points:
            which = f" with mask {mask!r}" if "mask" in fields else ""
            raise ValueError(f"{path}: no throughput rows{which}")
        q_lens = np.array(sorted({k[0] for k in points}))
        kv_lens = np.array(sorted({k[1] for k in points}))
        if len(points) != q_lens.size * kv_lens.size:
            raise ValueError(f"{path}: the (q_len, kv_len) points must form a full grid")
        grid = np.array([[points[(q, k)] for k in kv_lens] for q in q_lens])
        return cls(q_lens, kv_lens, grid)

    def throughput(self, q_len, kv_len) -> np.ndarray:
        """Pairs per second for tasks of the given shapes (arrays broadcast), float64."""
        q = np.log2(np.clip(np.asarray(q_len, dtype=np.float64), 1, None))
        k = np.log2(np.clip(np.asarray(kv_len, dtype=np.float64), 1, None))
        gq, gk = np.log2(self.q_lens), np.log2(self.kv_lens)
        iq, fq = _bracket(gq, q)
        ik, fk = _bracket(gk, k)
        t = self.pairs_per_s
        top = t[iq, ik] * (1 - fk) + t[iq, ik + 1 if gk.size > 1 else ik] * fk
        jq = iq + 1 if gq.size > 1 else iq
        bottom = t[jq, ik] * (1 - fk) + t[jq, ik + 1 if gk.size > 1 else ik] * fk
        return top * (1 - fq) + bottom * fq

    def seconds(self, q_len, kv_len, pairs) -> np.ndarray:
        """Predicted seconds of tasks with these shapes and score pairs, float64."""
        return np.asarray(pairs, dtype=np.float64) / self.throughput(q_len, kv_len)


def _read_points(reader: csv.DictReader, path: Path, mask: str):
    """({(q_len, kv_len): pairs_per_s} of the rows of ``mask``, the header's fields); ValueError
    naming the file and line of a malformed row."""
    need = {"q_len", "kv_len", "pairs_per_s"}
    if reader.fieldnames is None or not need <= set(reader.fieldnames):
        raise ValueError(f"{path}: needs columns {sorted(need)}, got {reader.fieldnames}")
    points: dict[tuple[float, float], float] = {}
    for row in reader:
        at = f"{path}:{reader.line_num}"
        if None in row or None in row.values():  # DictReader's marks of extra/missing fields
            fields = sum(v is not None for k, v in row.items() if k is not None)
            raise ValueError(f"{at}: {fields + len(row.get(None, []))} fields, the header has "
                             f"{len(reader.fieldnames)}")
        if "mask" in reader.fieldnames and row["mask"] != mask:
            continue
        try:
            key = (float(row["q_len"]), float(row["kv_len"]))
            value = float(row["pairs_per_s"])
        except ValueError as exc:
            raise ValueError(f"{at}: {exc}") from None
        if not (key[0] >= 1 and key[1] >= 1 and value > 0 and math.isfinite(value)):
            raise ValueError(f"{at}: need q_len, kv_len >= 1, pairs_per_s > 0")
        if key in points:
            raise ValueError(f"{at}: a second row for q_len={key[0]:g}, kv_len={key[1]:g}")
        points[key] = value
    return points, reader.fieldnames


def _bracket(grid: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the lower grid point and the fraction towards the next one (clamped)."""
    if grid.size == 1:
        return np.zeros(np.shape(x), dtype=np.int64), np.zeros(np.shape(x))
    x = np.clip(x, grid[0], grid[-1])
    i = np.clip(np.searchsorted(grid, x, side="right") - 1, 0, grid.size - 2)
    return i, (x - grid[i]) / (grid[i + 1] - grid[i])
