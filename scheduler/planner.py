"""The communication-aware balancing planner and the ``plan_step`` entry point (design §4).

Start from colocated attention: every segment (a turn cut at worker boundaries) runs on the
worker that holds its queries. Servers above ``cap = (1+ε)·mean`` shed exactly their excess to
servers below it, biggest room first. What they shed is cut to move the most score pairs per byte:

* the *tail band* of a segment's rows: the last rows of a causal turn see the longest kv prefix,
  so they carry the most pairs per query token;
* only the kv columns next to the diagonal when the receiver needs less than the whole band
  (a kv split): the band's rows keep their far-left columns at home as a full task. For a piece
  of ``r`` pairs, ``a`` query rows by ``K`` kv columns costs ``a·q_bytes + K·kv_bytes``, least at
  ``a ≈ sqrt(r·kv_bytes/q_bytes)``: the band height is chosen there.

Every cut leaves pieces of at least ``min_shard_tokens`` rows and kv columns (or the whole range).
Each piece is one CA-task; the segment's untouched rows and the kept left columns stay as tasks on
the home worker, so the tasks tile each document's mask exactly once. Python loops run over pieces
(about one per receiver), never over server pairs or tokens.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Sequence

import numpy as np
from distca.scheduler.cost import CostTable, ModelShape
from distca.scheduler.documents import (
    Document,
    DocumentBatch,
    Segments,
    as_document_batch,
    build_segments,
)
from distca.scheduler.plan import Plan, imbalance, make_tasks

PLANNERS = ("distca", "greedy-baseline")


def plan_step(docs: DocumentBatch | Sequence[Document], num_workers: int, tokens_per_worker: int,
              num_servers: int | None = None, tolerance: float = 0.1,
              min_shard_tokens: int = 128, model: ModelShape | None = None,
              planner: str = "distca", cost_table: CostTable | None = None) -> Plan:
    """Plan one step: which server computes which CA-task.

    docs: the step's documents (``documents_from_batch``), back to back from token 0 and fitting
    in ``num_workers * tokens_per_worker`` tokens. num_servers defaults to num_workers; servers
    ``>= num_workers`` are dedicated (hold no tokens). tolerance ε >= 0: target
    ``max <= (1+ε)·mean`` of server cost. cost_table: optional measured throughput; with it the
    planner balances predicted seconds instead of score pairs (the plan still reports pairs).
    """
    batch = as_document_batch(docs)
    num_servers = num_workers if num_servers is None else num_servers
    model = model or ModelShape()
    _check(batch, num_workers, tokens_per_worker, num_servers, tolerance, min_shard_tokens,
           planner)
    segments = build_segments(batch, tokens_per_worker)
    before = np.zeros(num_servers, dtype=np.int64)
    np.add.at(before, segments.home, segments.pairs())
    if planner == "distca":
        columns = balance(segments, num_servers, tolerance, min_shard_tokens, model, cost_table)
    else:
        from distca.scheduler.greedy_baseline import balance_greedy

        columns = balance_greedy(segments, batch, num_servers, tolerance, model)
    return Plan(make_tasks(*columns), num_workers, tokens_per_worker, num_servers, model,
                imbalance(before))


def timed_plan_step(*args, **kwargs) -> tuple[Plan, float]:
    """``plan_step`` plus its wall time in milliseconds."""
    start = time.perf_counter()
    plan = plan_step(*args, **kwargs)
    return plan, (time.perf_counter() - start) * 1e3


def _check(batch, num_workers, tokens_per_worker, num_servers, tolerance, min_shard, planner):
    if planner not in PLANNERS:
        raise ValueError(f"planner must be one of {PLANNERS}, got {planner!r}")
    if num_workers < 1 or tokens_per_worker < 1:
        raise ValueError(f"need num_workers >= 1 and tokens_per_worker >= 1, got "
                         f"{num_workers} and {tokens_per_worker}")
    if num_servers < num_workers:
        raise ValueError(f"num_servers={num_servers} < num_workers={num_workers}: every worker "
                         "is also a server")
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise ValueError(f"tolerance must be a finite value >= 0, got {tolerance}")
    if min_shard < 1:
        raise ValueError(f"min_shard_tokens must be >= 1, got {min_shard}")
    if batch.num_tokens > num_workers * tokens_per_worker:
        raise ValueError(f"documents hold {batch.num_tokens} tokens, more than "
                         f"{num_workers} workers x {tokens_per_worker}")


class _Cutter:
    """Cuts pieces off the tail of segments; keeps the segments' remaining rows and the tasks."""

    def __init__(self, seg: Segments, min_shard: int, model: ModelShape,
                 cost_table: CostTable | None):
        self.seg = seg
        self.m = min_shard
        self.rho = model.q_bytes / model.kv_bytes
        self.table = cost_table
        self.row_end = seg.q_end.copy()  # rows [q_start, row_end) of each segment stay home
        self.tasks: list[tuple[int, int, int, int, int, int, bool]] = []

    def units(self, pairs: float, rows: int, cols: int) -> float:
        """Planning cost of a task: score pairs, or seconds with a throughput table."""
        if self.table is None:
            return float(pairs)
        return float(self.table.seconds(rows, cols, pairs))

    def cut(self, i: int, server: int, lo: float, hi: float, owed: float) -> float | None:
        """Move a tail piece of segment ``i`` to ``server``, aiming at cost in [lo, hi].

        ``owed`` is what the donor still has to shed: the rows a kv split leaves at home are lost
        to later pieces, so splits may only waste the segment's spare capacity beyond ``owed``.
        Returns the moved cost (planning units), or None if no valid piece fits under ``hi``.
        """
        s = self.seg
        x, qs, ds = int(self.row_end[i]), int(s.q_start[i]), int(s.kv_start[i])
        causal = bool(s.causal[i])
        rows = x - qs
        if rows <= 0:
            return None
        e = x if causal else int(s.kv_end[i])
        full_kv = e - ds
        if self.table is not None:
            rate = float(self.table.throughput(min(rows, self.m), full_kv))
            lo, hi, owed = lo * rate, hi * rate, owed * rate
        capacity = rows * full_kv - (rows * (rows - 1) // 2 if causal else 0)
        shape = self._shape(rows, full_kv, causal, lo, hi, capacity - min(owed, capacity))
        if shape is None:
            return None
        a, k = shape
        pairs = a * k - (a * (a - 1) // 2 if causal else 0)
        doc = int(s.doc[i])
        self.tasks.append((server, doc, x - a, x, e - k, e, causal))
        if k < full_kv:
            self.tasks.append((int(s.home[i]), doc, x - a, x, ds, e - k, False))
        self.row_end[i] = x - a
        return self.units(pairs, a, k)

    def _shape(self, rows: int, full_kv: int, causal: bool, lo: float, hi: float, slack: float):
        """Rows ``a`` and kv columns ``k`` of the piece, or None if nothing valid fits ``hi``.

        A piece of ``a`` rows leaves ``a·(full_kv - k)`` pairs at home; that may not exceed slack.
        """
        m = self.m

        def cost(a: int, k: int) -> int:
            return a * k - (a * (a - 1) // 2 if causal else 0)

        def valid_rows(a: int) -> int:
            a = max(min(a, rows), min(m, rows))
            return rows if rows - a < m else a

        best = round(math.sqrt(max(lo, 1.0) / self.rho))
        a = max(min(best, self._rows_for(lo + slack, full_kv, causal, up=False)),
                self._rows_for(lo, full_kv, causal))
        a = valid_rows(a)
        tri = a * (a - 1) // 2 if causal else 0
        k_min = max(a if causal else 1, min(m, full_kv))
        k = max(math.ceil((lo + tri) / a), k_min)
        if full_kv - k < m or a * (full_kv - k) > slack:
            k = full_kv
        if cost(a, k) <= hi:
            return a, k
        k = min(math.floor((hi + tri) / a), full_kv - m)
        if k >= k_min and a * (full_kv - k) <= slack:
            return a, k
        a = min(self._rows_for(hi, full_kv, causal, up=False), rows - m)
        if a < max(1, min(m, rows)):
            return None
        return a, full_kv

    @staticmethod
    def _rows_for(target: float, full_kv: int, causal: bool, up: bool = True) -> int:
        """Rows of a whole tail band whose cost first reaches (or last stays under) target."""
        if causal:
            b = full_kv + 0.5
            disc = b * b - 2 * target
            real = b - math.sqrt(disc) if disc > 0 else b
        else:
            real = target / full_kv
        a = max(1, math.ceil(real) if up else math.floor(real))

        def cost(rows: int) -> float:
            return rows * full_kv - (rows * (rows - 1) / 2 if causal else 0)

        if up:
            while a > 1 and cost(a - 1) >= target:
                a -= 1
            while cost(a) < target and a < full_kv:
                a += 1
        else:
            while a > 0 and cost(a) > target:
                a -= 1
            while a + 1 <= full_kv and cost(a + 1) <= target:
                a += 1
        return a

    def columns(self):
        """All tasks as columns for ``make_tasks``: moved pieces, kept columns, kept rows."""
        s = self.seg
        kept_kv_end = np.where(s.causal, self.row_end, s.kv_end)
        moved = np.array(self.tasks, dtype=np.int64).reshape(-1, 7)
        return tuple(np.concatenate([a, b]) for a, b in zip(
            (s.home, s.doc, s.q_start, self.row_end, s.kv_start, kept_kv_end, s.causal),
            (moved[:, 0], moved[:, 1], moved[:, 2], moved[:, 3], moved[:, 4], moved[:, 5],
             moved[:, 6].astype(bool))))


def balance(seg: Segments, num_servers: int, tolerance: float, min_shard: int,
            model: ModelShape, cost_table: CostTable | None):
    """Run the planner; returns task columns (server, doc, q_start, q_end, kv_start, kv_end,
    causal) for ``make_tasks``."""
    cutter = _Cutter(seg, min_shard, model, cost_table)
    q_len, kv_len = seg.q_end - seg.q_start, seg.kv_end - seg.kv_start
    pairs = seg.pairs()
    weight = pairs.astype(np.float64) if cost_table is None else \
        cost_table.seconds(q_len, kv_len, pairs)
    load = np.bincount(seg.home, weights=weight, minlength=num_servers)
    cap = (1 + tolerance) * load.sum() / num_servers
    need = load - cap
    donors = [int(d) for d in np.lexsort((np.arange(num_servers), -need)) if need[d] > 0]
    receivers = [(-(cap - load[r]), int(r)) for r in range(num_servers) if load[r] < cap]
    heapq.heapify(receivers)
    # Densest segments first: the last row of a segment sees the longest kv range.
    density = np.where(seg.causal, seg.q_end, seg.kv_end) - seg.kv_start
    by_home = np.lexsort((np.arange(len(seg)), -density, seg.home))
    bounds = np.searchsorted(seg.home[by_home], np.arange(num_servers + 1))
    for d in donors:
        owed = float(need[d])
        queue = [int(i) for i in by_home[bounds[d]:bounds[d + 1]]]
        q = 0
        while owed > 0 and q < len(queue) and receivers:
            room, r = heapq.heappop(receivers)
            room = -room
            moved = cutter.cut(queue[q], r, min(owed, room), room, owed)
            if moved is None or cutter.row_end[queue[q]] <= seg.q_start[queue[q]]:
                q += 1
            if moved is not None:
                owed -= moved
                room -= moved
            heapq.heappush(receivers, (-room, r))
        # Nothing fits any room at the minimum shard size: overshoot the roomiest server.
        while owed > 0 and q < len(queue) and receivers:
            room, r = heapq.heappop(receivers)
            moved = cutter.cut(queue[q], r, owed, math.inf, owed)
            if moved is None or cutter.row_end[queue[q]] <= seg.q_start[queue[q]]:
                q += 1
            heapq.heappush(receivers, (room + (moved or 0.0), r))
            owed -= moved or 0.0
    return cutter.columns()
