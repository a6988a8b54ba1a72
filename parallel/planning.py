"""The step's plan as every rank needs it: per-server task inputs plus balance figures.

``cad.enabled=false`` (colocated): every task stays on the worker holding its queries; each rank
derives that placement itself from the document lengths (cheap, deterministic). With
disaggregation, global rank 0 runs the scheduler and broadcasts the plan as one compact array.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from distca.parallel.layout import ServerInputs, colocated_server_inputs
from distca.scheduler import ModelShape, Plan, plan_step
from distca.scheduler.documents import build_segments, documents_from_batch


@dataclass
class StepPlan:
    servers: list[ServerInputs]  # one per server, global token coordinates resolved
    imbalance_before: float  # max/mean attention cost per worker with colocated placement
    imbalance: float  # max/mean attention cost per server with this plan


def _max_over_mean(cost: np.ndarray) -> float:
    mean = float(cost.mean()) if cost.size else 0.0
    return float(cost.max()) / mean if mean > 0 else 1.0


def colocated_plan(doc_lengths, turn_lengths, turn_is_context, num_workers: int,
                   tokens_per_worker: int) -> StepPlan:
    docs = documents_from_batch(doc_lengths, turn_lengths, turn_is_context)
    segments = build_segments(docs, tokens_per_worker)
    cost = np.bincount(segments.home, weights=segments.pairs(), minlength=num_workers)
    ratio = _max_over_mean(cost)
    return StepPlan(colocated_server_inputs(segments, num_workers), ratio, ratio)


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


def disaggregated_plan(doc_lengths, turn_lengths, turn_is_context, num_workers: int,
                       tokens_per_worker: int, tolerance: float, min_shard_tokens: int,
                       model: ModelShape, device: torch.device, src: int = 0) -> StepPlan:
    """Balanced plan computed on global rank ``src`` and broadcast compactly to every rank."""
    array = None
    if dist.get_rank() == src:
        docs = documents_from_batch(doc_lengths, turn_lengths, turn_is_context)
        array = plan_step(docs, num_workers=num_workers, tokens_per_worker=tokens_per_worker,
                          num_servers=num_workers, tolerance=tolerance,
                          min_shard_tokens=min_shard_tokens, model=model).to_array()
    plan = Plan.from_array(broadcast_array(array, src, device))
    servers = [plan.server_inputs(s) for s in range(plan.num_servers)]
    return StepPlan(servers, plan.imbalance_before, plan.imbalance)
