"""Gathering a task list into packed varlen batches, and scattering results back (GPU backends).

flash-attn's varlen kernels take one mask type per call, so the tasks are split into a causal
and a full batch; each batch packs its tasks' query rows and key rows back to back
(``cu_seqlens`` int32). Results come back per packed row and are merged per query token by LSE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .gpu_probe import host_to_device


@dataclass
class VarlenCall:
    """One varlen call: ``q_index`` (Pq,) and ``kv_index`` (Pk,) int64 rows into q and k/v."""

    causal: bool
    q_index: torch.Tensor
    kv_index: torch.Tensor
    cu_q: torch.Tensor  # (B + 1,) int32
    cu_kv: torch.Tensor  # (B + 1,) int32
    max_q: int
    max_kv: int


def _ranges_index(ranges: list[tuple[int, int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([b - a for a, b in ranges], dtype=torch.int64)
    starts = torch.tensor([a for a, _ in ranges], dtype=torch.int64)
    offsets = torch.cumsum(lengths, 0) - lengths
    index = torch.arange(int(lengths.sum())) - torch.repeat_interleave(offsets - starts, lengths)
    cu = torch.zeros(len(ranges) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    return host_to_device(index, device), host_to_device(cu, device)


def pack_tasks(rows: list[tuple[int, int, int, int, bool]], device) -> list[VarlenCall]:
    """Non-empty tasks grouped into at most two batches (causal, full)."""
    batches = []
    for causal in (True, False):
        chosen = [r for r in rows if r[4] == causal and r[1] > r[0] and r[3] > r[2]]
        if not chosen:
            continue
        q_index, cu_q = _ranges_index([(a, b) for a, b, _, _, _ in chosen], device)
        kv_index, cu_kv = _ranges_index([(c, d) for _, _, c, d, _ in chosen], device)
        batches.append(VarlenCall(causal, q_index, kv_index, cu_q, cu_kv,
                                   max(b - a for a, b, _, _, _ in chosen),
                                   max(d - c for _, _, c, d, _ in chosen)))
    return batches
