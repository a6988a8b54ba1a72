"""The step's plan as every rank needs it: per-server task inputs plus balance figures.

``cad.enabled=false`` (colocated): every task stays on the worker holding its queries; each rank
derives that placement itself from the document lengths (cheap, deterministic). With
disaggregation, global rank 0 runs the scheduler and broadcasts the plan as one compact array.

Buffers are sized from the plan. A plan whose largest per-rank receive buffer exceeds the
budget is re-planned with a larger tolerance (fewer, smaller moves) until it fits; if even the
plan that moves nothing does not fit, every rank raises the same error. Nothing is truncated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from distca.parallel.layout import (
    DispatchLayout,
    ServerInputs,
    build_layout,
    colocated_server_inputs,
)
from distca.parallel.pingpong import split_nano_batches
from distca.scheduler import DocumentBatch, ModelShape, Plan, plan_step
from distca.scheduler.documents import build_segments


@dataclass
class StepPlan:
    servers: list[ServerInputs]  # one per server, global token coordinates resolved
    imbalance_before: float  # max/mean attention cost per worker with colocated placement
    imbalance: float  # max/mean attention cost per server with this plan
    tolerance: float = 0.0  # the tolerance the plan was made with (raised to fit the budget)

    def layouts(self, rank: int, num_workers: int, tokens_per_worker: int, group_size: int,
                ping_pong: bool, device: torch.device | str = "cpu"
                ) -> DispatchLayout | tuple[DispatchLayout, DispatchLayout]:
        """Exchange layout of group rank ``rank`` (server ``s`` is group rank ``s``; ranks
        ``>= num_workers`` hold no tokens); with ``ping_pong``, one per nano-batch."""
        def layout(servers):
            return build_layout(servers, rank, num_workers, tokens_per_worker, group_size,
                                list(range(len(servers))), device)

        if ping_pong:
            return tuple(layout(half) for half in split_nano_batches(self.servers))
        return layout(self.servers)


def _max_over_mean(cost: np.ndarray) -> float:
    mean = float(cost.mean()) if cost.size else 0.0
    return float(cost.max()) / mean if mean > 0 else 1.0


def colocated_plan(docs: DocumentBatch, num_workers: int, tokens_per_worker: int) -> StepPlan:
    segments = build_segments(docs, tokens_per_worker)
    cost = np.bincount(segments.home, weights=segments.pairs(), minlength=num_workers)
    ratio = _max_over_mean(cost)
    return StepPlan(colocated_server_inputs(segments, num_workers), ratio, ratio, float("inf"))


def broadcast_array(array: np.ndarray | None, src: int, device: torch.device) -> np.ndarray:
    """Broadcast a 1-D int64 array from global rank ``src`` (size first, then the data)."""
    size = torch.zeros(1, dtype=torch.int64, device=device)
    if dist.get_rank() == src:
        size[0] = array.size
    dist.broadcast(size, src)
    data = torch.empty(int(size[0]), dtype=torch.int64, device=device)
    if dist.get_rank() == src:
        data.copy_(torch.as_tensor(array, dtype=torch.int64))
    dist.broadcast(data, src)
    return data.cpu().numpy()


def receive_bytes(plan: Plan) -> np.ndarray:
    """(num_servers,) int64: bytes each rank receives in one layer's forward exchanges.

    Rank ``s`` receives the q, k, v rows of server ``s``'s tasks (its own included: they travel
    through the same buffer) and, as worker ``s``, out + fp32 lse of every query row it sent.
    Dedicated servers (``s >= num_workers``) hold no tokens and get nothing back.
    """
    m = plan.model
    got = np.zeros(plan.num_servers, dtype=np.int64)
    for s in range(plan.num_servers):
        q_tokens, kv_tokens, *_ = plan.server_inputs(s)
        got[s] = (q_tokens.size * m.h_q + 2 * kv_tokens.size * m.h_kv) * m.head_dim * m.bytes_per_elem
        # out + lse of each query row go back to the worker holding it
        owner = q_tokens // plan.tokens_per_worker
        np.add.at(got, owner, m.h_q * (m.head_dim + 1) * 4)
    return got


def plan_within_budget(docs, num_workers: int, tokens_per_worker: int, num_servers: int,
                       tolerance: float, min_shard_tokens: int, model: ModelShape,
                       budget_bytes: float) -> tuple[Plan | None, float, int]:
    """(plan, tolerance used, largest receive buffer in bytes); plan is None when no tolerance
    fits the budget. The tolerance doubles (at least +0.05) until the plan fits or moves nothing.
    """
    while True:
        plan = plan_step(docs, num_workers=num_workers, tokens_per_worker=tokens_per_worker,
                         num_servers=num_servers, tolerance=tolerance,
                         min_shard_tokens=min_shard_tokens, model=model)
        need = int(receive_bytes(plan).max())
        if need <= budget_bytes:
            return plan, tolerance, need
        if plan.bytes_moved == 0 or tolerance >= plan.imbalance_before:
            return None, tolerance, need
        tolerance = max(2 * tolerance, tolerance + 0.05)


_NO_PLAN = -1  # first value of the broadcast array when no plan fits the buffer budget


def disaggregated_plan(docs: DocumentBatch, num_workers: int, tokens_per_worker: int, tolerance: float, min_shard_tokens: int,
                       model: ModelShape, device: torch.device, src: int = 0,
                       num_servers: int | None = None,
                       buffer_budget_mb: float = float("inf")) -> StepPlan:
    """Balanced plan computed on global rank ``src`` and broadcast compactly to every rank.

    ``num_servers`` defaults to ``num_workers`` (in place); servers beyond the workers are
    dedicated and hold no tokens. Raises ValueError on every rank if no plan fits
    ``buffer_budget_mb`` (MiB per rank and layer exchange).
    """
    num_servers = num_workers if num_servers is None else num_servers
    array = None
    if dist.get_rank() == src:
        plan, used, need = plan_within_budget(docs, num_workers, tokens_per_worker, num_servers,
                                              tolerance, min_shard_tokens, model,
                                              buffer_budget_mb * 2**20)
        array = (np.array([_NO_PLAN, need], dtype=np.int64) if plan is None else
                 np.concatenate([[np.float64(used).view(np.int64)], plan.to_array()]))
    array = broadcast_array(array, src, device)
    if array[0] == _NO_PLAN:
        raise ValueError(f"cad.buffer_budget_mb={buffer_budget_mb:g}: even a plan that moves no "
                         f"attention needs a {array[1] / 2**20:.2f} MiB receive buffer on one rank")
    plan = Plan.from_array(array[1:])
    servers = [ServerInputs(*plan.server_inputs(s)) for s in range(plan.num_servers)]
    return StepPlan(servers, plan.imbalance_before, plan.imbalance,
                    float(array[:1].view(np.float64)[0]))
