"""The reference system's greedy planner (DistCA, design §4), kept as a baseline.

Its rules, reproduced on our segments so both planners see the same input:

* cost is score pairs only; a segment's rows are paired head-with-tail (row ``i`` from the front
  with row ``i`` from the back), so every mirror pair costs the same and moving ``k`` pairs moves
  ``k·(pair cost)`` — ``k(L+1)`` for a whole causal document of length ``L``. An odd middle row
  never moves (the reference asserts on odd lengths; this version just keeps that row home);
* while some server is under ``(1-ε)·mean``, the least-loaded one takes, from a server above the
  mean, the segment with the best pairs per byte, as many pairs as fill it to the mean without
  taking the donor below the mean. Its byte estimate assumes the whole document's k/v travels;
* it never splits kv ranges, ignores kv already on the receiver, and never re-checks servers that
  stay above ``(1+ε)·mean``.
"""

from __future__ import annotations

import numpy as np
from distca.scheduler.cost import ModelShape
from distca.scheduler.documents import DocumentBatch, Segments


def balance_greedy(seg: Segments, docs: DocumentBatch, num_servers: int, tolerance: float,
                   model: ModelShape):
    """Task columns (server, doc, q_start, q_end, kv_start, kv_end, causal) for ``make_tasks``."""
    rows = seg.q_end - seg.q_start
    last_row = np.where(seg.causal, seg.q_end, seg.kv_end) - seg.kv_start
    first_row = np.where(seg.causal, seg.q_start + 1, seg.kv_end) - seg.kv_start
    pair_cost = first_row + last_row
    pairs_left = rows // 2
    taken = np.zeros(len(seg), dtype=np.int64)
    load = np.zeros(num_servers, dtype=np.int64)
    np.add.at(load, seg.home, seg.pairs())
    mean = load.sum() / num_servers
    q_in_bytes = model.h_q * model.head_dim * model.bytes_per_elem
    doc_kv_bytes = docs.doc_length[seg.doc] * model.kv_bytes
    moves: list[tuple[int, int, int, int]] = []  # (segment, server, first pair, pairs)
    for _ in range(4 * (num_servers + len(seg))):
        if not (load < (1 - tolerance) * mean).any():
            break
        d = int(np.argmin(load))
        surplus = load[seg.home] - mean
        k = np.minimum(np.minimum(np.ceil((mean - load[d]) / pair_cost),
                                  np.floor(surplus / pair_cost)), pairs_left - taken)
        k = np.where(seg.home == d, 0, np.maximum(k, 0)).astype(np.int64)
        if not (k >= 1).any():
            break
        score = np.where(k >= 1, k * pair_cost / (2 * k * q_in_bytes + doc_kv_bytes), -1.0)
        i = int(np.argmax(score))
        moves.append((i, d, int(taken[i]), int(k[i])))
        taken[i] += k[i]
        load[seg.home[i]] -= k[i] * pair_cost[i]
        load[d] += k[i] * pair_cost[i]
    return _columns(seg, taken, moves)


def _columns(seg: Segments, taken: np.ndarray, moves: list[tuple[int, int, int, int]]):
    """Home keeps the middle rows; every move is a head task and a tail task on the receiver."""
    m = np.array(moves, dtype=np.int64).reshape(-1, 4)
    i, server, first, k = m[:, 0], m[:, 1], m[:, 2], m[:, 3]
    head_start = seg.q_start[i] + first
    tail_end = seg.q_end[i] - first

    def kv_end(causal, q_end, full_end):
        return np.where(causal, q_end, full_end)

    keep_start, keep_end = seg.q_start + taken, seg.q_end - taken
    c = seg.causal
    return (
        np.concatenate([seg.home, server, server]),
        np.concatenate([seg.doc, seg.doc[i], seg.doc[i]]),
        np.concatenate([keep_start, head_start, tail_end - k]),
        np.concatenate([keep_end, head_start + k, tail_end]),
        np.concatenate([seg.kv_start, seg.kv_start[i], seg.kv_start[i]]),
        np.concatenate([kv_end(c, keep_end, seg.kv_end),
                        kv_end(c[i], head_start + k, seg.kv_end[i]),
                        kv_end(c[i], tail_end, seg.kv_end[i])]),
        np.concatenate([c, c[i], c[i]]),
    )
