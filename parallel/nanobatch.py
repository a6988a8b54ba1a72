"""Token nano-batches for ping-pong over the linear layers (design §5).

Each rank's tokens are split into two nano-batches, *first* and *second*, that run every layer
staggered: while the first nano-batch's q/k/v (or results) are in flight, the second one runs
its linear layers, and the other way round. That only works if the first nano-batch's
exchange can leave before the second one's q/k/v exist, so the first nano-batch must be
*causally closed*: within every document it is a prefix (``[doc start, cut)``), and a
bidirectional context turn is never cut. The second nano-batch's tasks may read the first
one's k/v (they leave later).

The cut of a document is its first token in the second half of its worker's slice (or the
document's end), moved back to the start of a context turn it would split. Documents inside
one worker's slice are then halved at the slice's middle; a document spanning workers is cut
once, so the workers it covers after the cut hold only second-nano-batch tokens of it.

A step's plan is split the same way: a task whose query rows straddle its document's cut
becomes two tasks on the same server (causal tasks are bottom-right aligned, so the first
part's kv range ends ``q_end - cut`` tokens earlier). Both nano-batches' layouts index the rank's
tokens in nano-batch order: rows of the first, then rows of the second.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from distca.parallel.layout import (
    DispatchLayout,
    ServerInputs,
    build_layout,
    server_inputs_from_tasks,
    server_tasks,
)
from distca.scheduler import DocumentBatch


def document_cuts(docs: DocumentBatch, num_workers: int, tokens_per_worker: int) -> np.ndarray:
    """(num_workers * T,) int64: for each global token, the cut of its document (tokens before
    it are in the first nano-batch); a padding token gets its own index + 1 in the first half of
    its worker's slice and its own index in the second half."""
    t, half = tokens_per_worker, tokens_per_worker // 2
    start, length = docs.doc_start, docs.doc_length
    end = start + length
    cut = np.where(start % t >= half, start, np.minimum(end, start - start % t + half))
    # never split a bidirectional context turn: move the cut back to the turn's start
    turn_end = docs.turn_start + docs.turn_length
    turn = np.searchsorted(turn_end, cut, side="right")  # the turn holding token `cut`
    inside = turn < turn_end.size
    turn = np.minimum(turn, turn_end.size - 1)
    moves = inside & docs.turn_is_context[turn] & (docs.turn_start[turn] < cut)
    cut = np.where(moves, docs.turn_start[turn], cut)
    tokens = np.arange(num_workers * t, dtype=np.int64)
    per_token = np.where(tokens % t < half, tokens + 1, tokens)
    used = int(length.sum())
    per_token[:used] = np.repeat(cut, length)
    return per_token


def split_servers_at_cuts(servers: list[ServerInputs], cuts: np.ndarray
                          ) -> tuple[list[ServerInputs], list[ServerInputs]]:
    """Per-server task inputs of the first and the second nano-batch (global coordinates).

    Raises RuntimeError if a first-nano-batch task would read a second-nano-batch token (the
    plan broke the causal closure the ping-pong relies on).
    """
    halves: tuple[list[ServerInputs], list[ServerInputs]] = ([], [])
    for inputs in servers:
        q_start, q_end, kv_start, kv_end, causal = server_tasks(inputs)
        doc_cut = cuts[q_start]
        split = np.clip(doc_cut, q_start, q_end)
        kv_end_first = np.where(causal, kv_end - (q_end - split), kv_end)
        first = (split > q_start) & (kv_end_first > kv_start)
        if np.any(first & (kv_end_first > doc_cut)):
            bad = int(np.flatnonzero(first & (kv_end_first > doc_cut))[0])
            raise RuntimeError(f"task q=[{q_start[bad]}, {q_end[bad]}) kv=[{kv_start[bad]}, "
                               f"{kv_end[bad]}) reads past its document's nano-batch cut "
                               f"{doc_cut[bad]}")
        second = q_end > split
        halves[0].append(server_inputs_from_tasks(q_start[first], split[first], kv_start[first],
                                                  kv_end_first[first], causal[first]))
        halves[1].append(server_inputs_from_tasks(split[second], q_end[second],
                                                  kv_start[second], kv_end[second],
                                                  causal[second]))
    return halves


@dataclass
class NanoBatches:
    """This rank's two nano-batches of one micro-batch.

    ``rows[i]`` (n_i,) int64: local token indices of nano-batch ``i`` (ascending). Layout 0
    indexes the first nano-batch's rows (q, k, v of that nano-batch only). Layout 1 indexes q
    rows and merge rows within the second nano-batch and kv rows within the concatenation
    (first rows, then second rows). ``order`` (T,) int64: each local token's place in that
    concatenation, so ``torch.cat(per_nano).index_select(0, order)`` restores token order.
    """

    rows: tuple[torch.Tensor, torch.Tensor]
    order: torch.Tensor
    layouts: tuple[DispatchLayout, DispatchLayout]


def nano_rows(cuts: np.ndarray, worker: int | None, tokens_per_worker: int
              ) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """Worker ``worker``'s local token indices of the first and second nano-batch (ascending,
    int64) and ``order`` (T,) int64: each local token's place in their concatenation. A rank
    that holds no tokens (``worker`` None) gets empty arrays."""
    first_local = np.zeros(0, dtype=bool)
    if worker is not None:
        ids = np.arange(worker * tokens_per_worker, (worker + 1) * tokens_per_worker)
        first_local = ids < cuts[ids]
    rows = (np.flatnonzero(first_local), np.flatnonzero(~first_local))
    order = np.zeros(first_local.size, dtype=np.int64)
    order[np.concatenate(rows)] = np.arange(first_local.size)
    return rows, order


def nano_batches(servers: list[ServerInputs], cuts: np.ndarray, rank: int, num_workers: int,
                 tokens_per_worker: int, group_size: int,
                 device: torch.device | str = "cpu") -> NanoBatches:
    """Group rank ``rank``'s nano-batches and exchange layouts (server ``s`` = group rank ``s``)."""
    t = tokens_per_worker
    halves = split_servers_at_cuts(servers, cuts)
    server_ranks = list(range(len(servers)))
    rows_np, order = nano_rows(cuts, rank if rank < num_workers else None, t)
    n_first = rows_np[0].size
    order_t = torch.as_tensor(order, device=device)

    def remap(layout: DispatchLayout, q_base: int, kv_base: int) -> DispatchLayout:
        def to(idx: torch.Tensor, base: int) -> torch.Tensor:
            return order_t.index_select(0, idx) - base if idx.numel() else idx

        return replace(layout, send_q_idx=[to(i, q_base) for i in layout.send_q_idx],
                       send_kv_idx=[to(i, kv_base) for i in layout.send_kv_idx],
                       merge_index=to(layout.merge_index, q_base))

    layouts = [build_layout(h, rank, num_workers, t, group_size, server_ranks, device)
               for h in halves]
    rows = tuple(torch.as_tensor(r, dtype=torch.int64, device=device) for r in rows_np)
    return NanoBatches(rows, order_t, (remap(layouts[0], 0, 0), remap(layouts[1], n_first, 0)))
