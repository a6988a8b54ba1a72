"""Gathering a task list into packed varlen batches, and scattering results back (GPU backends).

flash-attn's varlen kernels take one mask type per call, so the tasks are split into a causal
and a full batch; each batch packs its tasks' query rows and key rows back to back
(``cu_seqlens`` int32). Results come back per packed row and are merged per query token by LSE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .gpu_probe import host_to_device
from .merge import NEG_INF


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


def merge_rows(num_q: int, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
               like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge packed partial results ``(q_index, out (P, H, D), lse (P, H))`` per query token.

    Returns ``out`` (num_q, H, D) in ``like.dtype`` and ``lse`` (num_q, H) float32; rows of no
    part get 0 and -inf. Vectorised: scatter-max, then index_add of the rescaled terms.
    """
    heads, dim = like.shape[1], like.shape[2]
    f32 = dict(dtype=torch.float32, device=like.device)
    row_max = torch.full((num_q, heads), NEG_INF, **f32)
    for index, _, lse in parts:
        row_max.scatter_reduce_(0, index.unsqueeze(1).expand_as(lse), lse, "amax")
    safe_max = torch.where(row_max == NEG_INF, 0.0, row_max)
    total = torch.zeros((num_q, heads), **f32)
    out = torch.zeros((num_q, heads, dim), **f32)
    for index, part_out, lse in parts:
        w = torch.exp(lse - safe_max[index])
        total.index_add_(0, index, w)
        out.index_add_(0, index, part_out.float() * w.unsqueeze(-1))
    live = total > 0
    lse = torch.where(live, safe_max + torch.log(torch.where(live, total, 1.0)), NEG_INF)
    out = out / torch.where(live, total, 1.0).unsqueeze(-1)
    return out.to(like.dtype), lse
