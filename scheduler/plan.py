"""A step's plan: CA-tasks per attention server and the send/receive layout derived from them.

Planning happens once per step on one rank; ``Plan.to_array`` packs the plan into one int64 array
for a single broadcast and ``Plan.from_array`` rebuilds it exactly on every rank. Everything else
(server costs, bytes, per-server gather lists, transfers) is derived from the task table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from distca.scheduler.cost import ModelShape
from distca.scheduler.documents import task_pairs

TASK_DTYPE = np.dtype([
    ("server", np.int64), ("doc", np.int64),
    ("q_start", np.int64), ("q_end", np.int64),
    ("kv_start", np.int64), ("kv_end", np.int64),
    ("causal", np.bool_),
])
TRANSFER_DTYPE = np.dtype([
    ("src", np.int64), ("dst", np.int64), ("is_kv", np.bool_),
    ("start", np.int64), ("end", np.int64),
])
_MAGIC = 0x43A7_0001  # "CA task plan", format version 1
_HEADER = 10


def make_tasks(server, doc, q_start, q_end, kv_start, kv_end, causal) -> np.ndarray:
    """A task table sorted by (server, doc, q_start, kv_start), empty tasks dropped."""
    tasks = np.empty(np.shape(server)[0], dtype=TASK_DTYPE)
    for name, column in zip(TASK_DTYPE.names, (server, doc, q_start, q_end, kv_start, kv_end,
                                                causal)):
        tasks[name] = column
    tasks = tasks[(tasks["q_end"] > tasks["q_start"]) & (tasks["kv_end"] > tasks["kv_start"])]
    order = np.lexsort((tasks["kv_start"], tasks["q_start"], tasks["doc"], tasks["server"]))
    return tasks[order]


def merge_intervals(group: np.ndarray, start: np.ndarray, end: np.ndarray, span: int):
    """Union of half-open intervals within each group.

    group, start, end: (N,) int64 with 0 <= start < end <= span. Returns (group, start, end) of
    the disjoint merged intervals, sorted by (group, start).
    """
    if group.size == 0:
        return group, start, end
    order = np.lexsort((start, group))
    g, s, e = group[order], start[order], end[order]
    # Offsetting every group by its own span makes one running maximum serve all groups at once.
    off = g * (span + 1)
    reach = np.maximum.accumulate(e + off)
    new = np.ones(g.size, dtype=bool)
    new[1:] = s[1:] + off[1:] > reach[:-1]
    first = np.flatnonzero(new)
    last = np.append(first[1:], g.size) - 1
    return g[first], s[first], reach[last] - off[first]


def expand_intervals(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """(sum of lengths,) int64: the tokens of disjoint sorted intervals, concatenated."""
    lengths = end - start
    total = int(lengths.sum())
    base = np.repeat(start - (np.cumsum(lengths) - lengths), lengths)
    return base + np.arange(total, dtype=np.int64)


@dataclass
class Plan:
    """CA-tasks of one step and everything the runtime derives from them.

    tasks: structured (N,) array of TASK_DTYPE, global token coordinates, half-open ranges,
    ``causal`` aligned bottom-right. Worker ``w < num_workers`` holds tokens ``[w*T, (w+1)*T)``
    and is also server ``w``; servers ``>= num_workers`` are dedicated and hold no tokens.
    """

    tasks: np.ndarray
    num_workers: int
    tokens_per_worker: int
    num_servers: int
    model: ModelShape
    imbalance_before: float
    server_cost: np.ndarray = field(init=False)  # (S,) int64 score pairs per server
    imbalance: float = field(init=False)  # max/mean of server_cost (1.0 when there is no work)
    bytes_moved: int = field(init=False)  # forward bytes of the dispatch (see transfers())

    def __post_init__(self) -> None:
        t = self.tasks
        pairs = task_pairs(t["q_end"] - t["q_start"], t["kv_end"] - t["kv_start"], t["causal"])
        self.server_cost = np.zeros(self.num_servers, dtype=np.int64)
        np.add.at(self.server_cost, t["server"], pairs)  # exact int64, unlike a float bincount
        self.imbalance = imbalance(self.server_cost)
        moves = self.transfers()
        length = moves["end"] - moves["start"]
        self.bytes_moved = int(np.where(moves["is_kv"], self.model.kv_bytes,
                                        self.model.q_bytes) @ length) if length.size else 0

    @property
    def num_tokens(self) -> int:
        return self.num_workers * self.tokens_per_worker

    def server_tasks(self, server: int) -> np.ndarray:
        lo, hi = np.searchsorted(self.tasks["server"], [server, server + 1])
        return self.tasks[lo:hi]

    def server_inputs(self, server: int):
        """What server ``server`` gathers and runs.

        Returns (q_tokens, kv_tokens, q_ranges, kv_ranges, causal): q_tokens (Nq,) and kv_tokens
        (Nk,) int64 sorted unique global token ids; q_ranges, kv_ranges (T_s, 2) int64 half-open
        ranges of each task in those gathered buffers; causal (T_s,) bool.
        """
        tasks = self.server_tasks(server)
        zeros = np.zeros(tasks.size, dtype=np.int64)
        q_tokens = expand_intervals(*merge_intervals(zeros, tasks["q_start"], tasks["q_end"],
                                                     self.num_tokens)[1:])
        kv_tokens = expand_intervals(*merge_intervals(zeros, tasks["kv_start"], tasks["kv_end"],
                                                      self.num_tokens)[1:])
        q0 = np.searchsorted(q_tokens, tasks["q_start"])
        k0 = np.searchsorted(kv_tokens, tasks["kv_start"])
        q_ranges = np.stack([q0, q0 + tasks["q_end"] - tasks["q_start"]], axis=1)
        kv_ranges = np.stack([k0, k0 + tasks["kv_end"] - tasks["kv_start"]], axis=1)
        return q_tokens, kv_tokens, q_ranges, kv_ranges, tasks["causal"].copy()

    def transfers(self) -> np.ndarray:
        """The send/receive layout: token ranges each server needs from other workers.

        Structured (M,) TRANSFER_DTYPE rows ``(src worker, dst server, is_kv, start, end)``,
        sorted by (dst, is_kv, start). q rows also mean the output and lse travel back dst -> src;
        kv is deduplicated per (src, dst) because each server gathers the union of its ranges.
        """
        t, size = self.tasks, self.tokens_per_worker
        parts = []
        for is_kv, (lo, hi) in ((False, ("q_start", "q_end")), (True, ("kv_start", "kv_end"))):
            dst, start, end = merge_intervals(t["server"], t[lo], t[hi], self.num_tokens)
            first = start // size
            count = (end - 1) // size - first + 1
            row = np.repeat(np.arange(dst.size), count)
            src = first[row] + np.arange(row.size) - np.repeat(np.cumsum(count) - count, count)
            piece = np.empty(row.size, dtype=TRANSFER_DTYPE)
            piece["src"], piece["dst"], piece["is_kv"] = src, dst[row], is_kv
            piece["start"] = np.maximum(start[row], src * size)
            piece["end"] = np.minimum(end[row], (src + 1) * size)
            parts.append(piece[piece["src"] != piece["dst"]])
        moves = np.concatenate(parts)
        return moves[np.lexsort((moves["start"], moves["is_kv"], moves["dst"]))]

    def to_array(self) -> np.ndarray:
        """(10 + 7N,) int64: the whole plan for one broadcast; ``Plan.from_array`` inverts it."""
        m = self.model
        header = np.array([_MAGIC, self.num_workers, self.tokens_per_worker, self.num_servers,
                           m.h_q, m.h_kv, m.head_dim, m.bytes_per_elem,
                           np.float64(self.imbalance_before).view(np.int64), self.tasks.size],
                          dtype=np.int64)
        columns = [self.tasks[name].astype(np.int64) for name in TASK_DTYPE.names]
        return np.concatenate([header, *columns])

    @classmethod
    def from_array(cls, array: np.ndarray) -> Plan:
        a = np.asarray(array, dtype=np.int64).reshape(-1)
        if a.size < _HEADER or a[0] != _MAGIC:
            raise ValueError("not a distca plan array (bad header)")
        n = int(a[9])
        if a.size != _HEADER + 7 * n:
            raise ValueError(f"plan array holds {a.size} values, expected {_HEADER + 7 * n}")
        tasks = np.empty(n, dtype=TASK_DTYPE)
        for i, name in enumerate(TASK_DTYPE.names):
            tasks[name] = a[_HEADER + i * n:_HEADER + (i + 1) * n]
        model = ModelShape(*(int(x) for x in a[4:8]))
        return cls(tasks, int(a[1]), int(a[2]), int(a[3]), model, float(a[8:9].view(np.float64)[0]))


def imbalance(cost: np.ndarray) -> float:
    """max/mean of per-server cost; 1.0 when there is no work."""
    total = float(np.sum(cost, dtype=np.float64))
    if total <= 0:
        return 1.0
    return float(np.max(cost)) * cost.size / total
