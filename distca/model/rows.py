"""Rows of a (T, ...) tensor sharded over a process group, as autograd functions.

Used where each rank of a tensor-parallel group keeps ``ceil(T/tp)`` of a tensor's rows that
every rank of the group computes identically: full recomputation's kept layer input
(:mod:`distca.model.recompute`) and sequence parallelism's nano-batches in the staggered path
(:mod:`distca.model.staggered`). The last shard is zero-padded.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _gather(shard: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts)


def _own(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's ``ceil(T/world)`` rows of ``x`` (T, ...), zero-padded."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = -(-x.shape[0] // world)
    return pad_rows(x, n * world)[rank * n:(rank + 1) * n].contiguous()


class _ShardRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rows = group, x.shape[0]
        return _own(x, group).clone()

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.group)[:ctx.rows], None


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shard, group, rows):
        ctx.group = group
        return _gather(shard, group)[:rows]

    @staticmethod
    def backward(ctx, grad):
        return _own(grad, ctx.group), None, None


def shard_rows(x: torch.Tensor, group) -> torch.Tensor:
    """(T, ...) the same on every rank of ``group`` → this rank's ``ceil(T/world)`` rows;
    backward all-gathers the shards' gradients."""
    return _ShardRows.apply(x, group)


def gather_rows(shard: torch.Tensor, group, rows: int) -> torch.Tensor:
    """Inverse of :func:`shard_rows`: the first ``rows`` rows of the gathered shards; backward
    keeps this rank's rows of the gradient (which must be the same on every rank)."""
    return _GatherRows.apply(shard, group, rows)


def pad_rows(x: torch.Tensor, rows: int, value: float = 0.0) -> torch.Tensor:
    """``x`` (n, ...) with ``rows - n`` rows of ``value`` appended."""
    return torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1) + (0, rows - x.shape[0]),
                                   value=value)
