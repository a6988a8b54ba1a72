"""Send/receive layout of one attention exchange, derived from a step's plan (design §5).

Roles: worker ``w`` holds the linear-layer tokens ``[w*T, (w+1)*T)`` of the packed stream and is
rank ``w`` of the exchange group; server ``s`` runs on group rank ``server_ranks[s]``. A server's
inputs come from the plan as sorted unique global token ids (``q_tokens``, ``kv_tokens``) plus
its task list with ranges local to those buffers. Because the ids are sorted and workers hold
contiguous ascending slices, a server's buffer is simply the concatenation of what each worker
sends, in worker order — no permutation on the receive side.

kv rows are deduplicated per (worker, server): a kv token used by several tasks on one server is
sent once, and autograd sums the gradients of its copies when it is gathered on the worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch


class ServerInputs(NamedTuple):
    """One server's share of a plan: the global token ids whose rows it receives and its tasks
    with ranges local to those buffers (what :meth:`distca.scheduler.Plan.server_inputs`
    returns, unpackable in this order)."""

    q_tokens: np.ndarray  # (Nq,) int64 sorted unique global token ids of its query rows
    kv_tokens: np.ndarray  # (Nkv,) int64 sorted unique global token ids of its kv rows
    q_ranges: np.ndarray  # (T, 2) int64 [start, end) into the q buffer, per task
    kv_ranges: np.ndarray  # (T, 2) int64 [start, end) into the kv buffer, per task
    causal: np.ndarray  # (T,) bool


@dataclass
class DispatchLayout:
    """Everything one rank needs to run one exchange; index tensors are int64 on ``device``.

    Worker side (empty on server-only ranks): ``send_q_idx[s]``/``send_kv_idx[s]`` are local token
    indices sent to server ``s``. Server side (empty when this rank serves nothing): per-source row
    counts ``recv_q_counts``/``recv_kv_counts`` (indexed by group rank) and the task list.
    """

    group_size: int
    server_ranks: list[int]
    tokens_per_worker: int
    send_q_idx: list[torch.Tensor]  # per server: (n_q,) int64 local indices
    send_kv_idx: list[torch.Tensor]  # per server: (n_kv,) int64 local indices
    recv_q_counts: list[int]  # per group rank: q rows this rank receives as a server
    recv_kv_counts: list[int]  # per group rank: kv rows this rank receives as a server
    q_ranges: torch.Tensor | None  # (T, 2) int64 into this server's q buffer, or None
    kv_ranges: torch.Tensor | None  # (T, 2) int64 into this server's kv buffer
    causal: torch.Tensor | None  # (T,) bool
    merge_index: torch.Tensor  # (sum n_q,) int64: local token of each returned partial row

    def servers_by_rank(self) -> list[int]:
        """Server indices in ascending group-rank order (the order of all-to-all chunks)."""
        return sorted(range(len(self.server_ranks)), key=self.server_ranks.__getitem__)

    def send_counts_by_rank(self, q_width: int, kv_width: int) -> list[int]:
        """Elements this rank sends to each group rank in the q/k/v exchange."""
        counts = [0] * self.group_size
        for s, g in enumerate(self.server_ranks):
            counts[g] += self.send_q_idx[s].numel() * q_width + 2 * self.send_kv_idx[s].numel() * kv_width
        return counts

    def return_counts_by_rank(self, row_width: int) -> list[int]:
        """Elements this worker receives back from each group rank (row_width per q row)."""
        counts = [0] * self.group_size
        for s, g in enumerate(self.server_ranks):
            counts[g] += self.send_q_idx[s].numel() * row_width
        return counts

    def recv_counts_by_rank(self, q_width: int, kv_width: int) -> list[int]:
        return [nq * q_width + 2 * nkv * kv_width
                for nq, nkv in zip(self.recv_q_counts, self.recv_kv_counts)]


def build_layout(servers: list[ServerInputs], rank: int, num_workers: int, tokens_per_worker: int,
                 group_size: int, server_ranks: list[int],
                 device: torch.device | str = "cpu") -> DispatchLayout:
    """The layout of group rank ``rank`` for tasks placed as ``servers[s]`` (one per server)."""
    if len(servers) != len(server_ranks):
        raise ValueError(f"{len(servers)} server inputs for {len(server_ranks)} server ranks")
    T = tokens_per_worker
    is_worker = rank < num_workers
    lo, hi = rank * T, (rank + 1) * T

    def local(ids: np.ndarray) -> torch.Tensor:
        a, b = np.searchsorted(ids, [lo, hi])
        return torch.as_tensor(ids[a:b] - lo, dtype=torch.int64, device=device)

    send_q, send_kv = [], []
    for q_tokens, kv_tokens, *_ in servers:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        send_q.append(local(np.asarray(q_tokens)) if is_worker else empty)
        send_kv.append(local(np.asarray(kv_tokens)) if is_worker else empty)

    recv_q, recv_kv = [0] * group_size, [0] * group_size
    q_ranges = kv_ranges = causal = None
    bounds = np.arange(num_workers + 1) * T
    for s, g in enumerate(server_ranks):
        if g != rank:
            continue
        q_tokens, kv_tokens, qr, kr, c = servers[s]
        recv_q[:num_workers] = np.diff(np.searchsorted(q_tokens, bounds)).tolist()
        recv_kv[:num_workers] = np.diff(np.searchsorted(kv_tokens, bounds)).tolist()
        q_ranges = torch.as_tensor(np.asarray(qr, dtype=np.int64).reshape(-1, 2), device=device)
        kv_ranges = torch.as_tensor(np.asarray(kr, dtype=np.int64).reshape(-1, 2), device=device)
        causal = torch.as_tensor(np.asarray(c, dtype=bool), device=device)
    # Returned rows arrive in group-rank order of their servers.
    by_rank = sorted(range(len(server_ranks)), key=server_ranks.__getitem__)
    merge_index = (torch.cat([send_q[s] for s in by_rank]) if send_q
                   else torch.zeros(0, dtype=torch.int64, device=device))
    return DispatchLayout(group_size, list(server_ranks), T, send_q, send_kv, recv_q, recv_kv,
                          q_ranges, kv_ranges, causal, merge_index)


def _union_ids(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Sorted unique token ids covered by the ranges ``[starts[i], ends[i])``."""
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    if starts.size == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    reach = np.maximum.accumulate(ends)
    new_run = np.ones(starts.size, dtype=bool)
    new_run[1:] = starts[1:] > reach[:-1]
    run_start = starts[new_run]
    run_end = np.maximum.reduceat(ends, np.flatnonzero(new_run))
    lengths = run_end - run_start
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(run_start, lengths) + offsets


def server_inputs_from_tasks(q_start, q_end, kv_start, kv_end, causal) -> ServerInputs:
    """One server's inputs from its tasks in global token coordinates (arrays of equal length).

    Returns (q_tokens, kv_tokens, q_ranges (T, 2), kv_ranges (T, 2), causal (T,)) with the
    ranges local to the gathered buffers.
    """
    q_start, q_end, kv_start, kv_end = (np.asarray(a, dtype=np.int64)
                                        for a in (q_start, q_end, kv_start, kv_end))
    q_tokens = _union_ids(q_start, q_end)
    kv_tokens = _union_ids(kv_start, kv_end)
    q_local = np.searchsorted(q_tokens, q_start)
    kv_local = np.searchsorted(kv_tokens, kv_start)
    q_ranges = np.stack([q_local, q_local + (q_end - q_start)], axis=1)
    kv_ranges = np.stack([kv_local, kv_local + (kv_end - kv_start)], axis=1)
    return ServerInputs(q_tokens, kv_tokens, q_ranges, kv_ranges, np.asarray(causal, dtype=bool))


def server_tasks(inputs: ServerInputs
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The inverse of :func:`server_inputs_from_tasks`: one server's tasks in global token
    coordinates, (q_start, q_end, kv_start, kv_end) int64 and causal bool, each (T,)."""
    q_tokens, kv_tokens, q_ranges, kv_ranges, causal = inputs
    q_ranges = np.asarray(q_ranges, dtype=np.int64).reshape(-1, 2)
    kv_ranges = np.asarray(kv_ranges, dtype=np.int64).reshape(-1, 2)
    # A task's local range is contiguous in the buffer and in global ids alike.
    q_start = np.asarray(q_tokens, dtype=np.int64)[q_ranges[:, 0]]
    kv_start = np.asarray(kv_tokens, dtype=np.int64)[kv_ranges[:, 0]]
    return (q_start, q_start + (q_ranges[:, 1] - q_ranges[:, 0]), kv_start,
            kv_start + (kv_ranges[:, 1] - kv_ranges[:, 0]), np.asarray(causal, dtype=bool))


def colocated_server_inputs(segments, num_workers: int) -> list[ServerInputs]:
    """Every task on the worker that holds its queries (no balancing): ``cad.enabled=false``.

    ``segments`` is a :class:`distca.scheduler.documents.Segments`.
    """
    out = []
    for w in range(num_workers):
        m = segments.home == w
        out.append(server_inputs_from_tasks(segments.q_start[m], segments.q_end[m],
                                            segments.kv_start[m], segments.kv_end[m],
                                            segments.causal[m]))
    return out
