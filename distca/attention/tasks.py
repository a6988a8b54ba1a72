"""A validated varlen list of CA-tasks (design §2) as the attention backends consume it.

A task ``t`` lets query tokens ``q_ranges[t] = [a, b)`` attend to key/value tokens
``kv_ranges[t] = [c, d)``, either fully or causally. Causal masks are aligned bottom-right
(flash-attention >= 2.1): query row ``a + i`` sees keys ``[c, d - (b - a) + i]``, so the last
query row sees the whole kv range and, when ``b - a > d - c``, the first rows of the task see
nothing. The tasks of one query token must not overlap in keys: their outputs are merged by LSE,
which equals attention over the union of their keys only when the key sets are disjoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class TaskList:
    """CA-tasks over ``num_q`` query tokens and ``num_kv`` key/value tokens.

    ``q_ranges``/``kv_ranges``: (T, 2) int64 on the CPU, ``[start, end)`` token indices.
    ``causal``: (T,) bool on the CPU. ``rows`` holds the same as Python tuples
    ``(q_start, q_end, kv_start, kv_end, causal)`` for the per-task loops.
    """

    q_ranges: torch.Tensor
    kv_ranges: torch.Tensor
    causal: torch.Tensor
    num_q: int
    num_kv: int
    rows: list[tuple[int, int, int, int, bool]] = field(repr=False, compare=False)
    _derived: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.rows)

    def derived(self, key: str, build: Callable[[], T]) -> T:
        """``build()``, once per list and ``key``: what a backend derives from the tasks (packed
        batches, a block mask) serves a forward and its backward."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    def coverage(self) -> torch.Tensor:
        """(num_q,) bool: True for query tokens that belong to at least one task."""
        covered = torch.zeros(self.num_q + 1, dtype=torch.int32)
        for a, b, c, d, _ in self.rows:
            if b > a and d > c:
                covered[a] += 1
                covered[b] -= 1
        return covered.cumsum(0)[: self.num_q] > 0


def _as_ranges(name: str, ranges, num_tasks: int | None) -> torch.Tensor:
    t = torch.as_tensor(ranges)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if t.ndim != 2 or t.shape[1] != 2:
        raise ValueError(f"{name} must have shape (T, 2), got {tuple(t.shape)}")
    if num_tasks is not None and t.shape[0] != num_tasks:
        raise ValueError(f"{name} has {t.shape[0]} tasks but q_ranges has {num_tasks}")
    return t.detach().to(device="cpu", dtype=torch.int64).contiguous()


def _check_bounds(name: str, ranges: torch.Tensor, limit: int, what: str) -> None:
    start, end = ranges[:, 0], ranges[:, 1]
    bad = (start < 0) | (end < start) | (end > limit)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{name}[{i}] = [{int(start[i])}, {int(end[i])}) is not a range inside the "
            f"{limit} {what} tokens (need 0 <= start <= end <= {limit})"
        )


def make_task_list(q_ranges, kv_ranges, causal, num_q: int, num_kv: int) -> TaskList:
    """Validate user task tensors against the token counts and build a :class:`TaskList`.

    Raises ``ValueError`` naming the argument, task index and values at fault.
    """
    q = _as_ranges("q_ranges", q_ranges, None)
    kv = _as_ranges("kv_ranges", kv_ranges, q.shape[0])
    c = torch.as_tensor(causal)
    if c.ndim != 1 or c.shape[0] != q.shape[0]:
        raise ValueError(f"causal must have shape ({q.shape[0]},), got {tuple(c.shape)}")
    if c.dtype != torch.bool:
        if c.dtype.is_floating_point or not ((c == 0) | (c == 1)).all():
            raise ValueError(f"causal must be a bool tensor, got dtype {c.dtype}")
        c = c != 0
    c = c.detach().cpu().contiguous()
    _check_bounds("q_ranges", q, num_q, "query")
    _check_bounds("kv_ranges", kv, num_kv, "key/value")
    rows = [
        (int(a), int(b), int(cs), int(ce), bool(m))
        for (a, b), (cs, ce), m in zip(q.tolist(), kv.tolist(), c.tolist())
    ]
    return TaskList(q, kv, c, num_q, num_kv, rows)


def split_causal(row: tuple[int, int, int, int, bool]) -> list[tuple[int, int, int, int, bool]]:
    """Rewrite one task as pieces whose causal parts are square (top-left == bottom-right).

    A bottom-right causal task with ``|q| < |kv|`` is a full task over the kv prefix the whole
    query range sees plus a square causal task; with ``|q| > |kv|`` the first ``|q| - |kv|``
    query rows see nothing and are dropped. Kernels that only know square causal masks (the
    aten CPU flash kernel) run these pieces; empty pieces are omitted.
    """
    a, b, c, d, causal = row
    nq, nk = b - a, d - c
    if nq <= 0 or nk <= 0:
        return []
    if not causal:
        return [row]
    if nq > nk:
        return [(b - nk, b, c, d, True)]
    pieces = []
    if nk > nq:
        pieces.append((a, b, c, d - nq, False))
    pieces.append((a, b, d - nq, d, True))
    return pieces


# ---- task lists of common masks, and the dense mask of one (tests and benchmarks) -------
def causal_document_tasks(doc_lengths: list[int]) -> TaskList:
    """Packed documents with causal masks: one ``(q=doc, kv=doc, causal)`` task per document."""
    q, start = [], 0
    for n in doc_lengths:
        q.append((start, start + n))
        start += n
    return make_task_list(q, q, [True] * len(q), start, start)


def multiturn_tasks(documents: list[list[tuple[int, bool]]]) -> TaskList:
    """GLM multi-turn masks (design §2) for documents given as ``[(turn_length, is_context)]``.

    Context turns are bidirectional within the turn, response turns causal; every token sees
    all earlier turns of its document. Turn ``t`` gives ``(q=turn, kv=[doc start, turn start),
    full)`` (when non-empty) and ``(q=turn, kv=turn, full or causal)``.
    """
    q, kv, causal, start = [], [], [], 0
    for turns in documents:
        doc_start = start
        for length, is_context in turns:
            turn = (start, start + length)
            if start > doc_start:
                q.append(turn)
                kv.append((doc_start, start))
                causal.append(False)
            q.append(turn)
            kv.append(turn)
            causal.append(not is_context)
            start += length
    return make_task_list(q, kv, causal, start, start)


def task_mask(tasks: TaskList) -> torch.Tensor:
    """(num_q, num_kv) bool: True where a query may attend to a key under some task.

    Causal tasks are aligned bottom-right: task row ``i`` sees its first ``|kv| - |q| + i + 1``
    keys.
    """
    mask = torch.zeros(tasks.num_q, tasks.num_kv, dtype=torch.bool)
    for a, b, c, d, causal in tasks.rows:
        if causal:
            rows = torch.arange(b - a).unsqueeze(1)
            cols = torch.arange(d - c).unsqueeze(0)
            mask[a:b, c:d] |= cols <= rows + (d - c) - (b - a)
        else:
            mask[a:b, c:d] = True
    return mask
