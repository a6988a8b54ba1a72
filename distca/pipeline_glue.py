"""Glue between :class:`distca.engine.Engine` and the pipeline schedules (design §5).

With ``parallel.pp > 1`` the engine needs, per step: its stage's pipeline neighbours
(:func:`stage_links`) and, for the lock-step schedule (disaggregated attention), the
cross-stage exchange group of its tensor rank (:func:`lockstep_exchange`; two nano-batches per
job with ``cad.ping_pong=true``) and one plan per forward tick over every ``dp * pp`` rank of
that group (:func:`lockstep_plans`, handed to the exchange by :func:`start_lockstep_step`), so
that ranks in the pipeline bubble serve the other stages' attention.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from distca.batch import PackedBatch
from distca.config import DistcaConfig
from distca.model.runtime import AttentionRuntime
from distca.parallel.lockstep import LockstepExchange, split_placement, tick_documents
from distca.parallel.nanobatch import document_cuts
from distca.parallel.pipeline import StageLinks
from distca.parallel.planning import StepPlan, disaggregated_plan
from distca.scheduler import ModelShape


def lockstep_exchange(cfg: DistcaConfig, coords: tuple[int, int, int], shape: ModelShape,
                      runtime: AttentionRuntime, dtype: torch.dtype, device: torch.device
                      ) -> LockstepExchange:
    """The cross-stage exchange group of this rank's tensor rank (collective on every rank);
    ``coords`` = this rank's (tensor, pipeline, data-parallel) rank; tasks run on ``runtime``'s
    kernel."""
    p, m = cfg.parallel, cfg.model
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, coords)
    groups = {}
    for t in range(p.tp):  # every rank creates every group, in the same order
        ranks = sorted(r for r, c in enumerate(everyone) if c[0] == t)
        if [everyone[r][1:] for r in ranks] != sorted(everyone[r][1:] for r in ranks):
            raise NotImplementedError("lock-step pipeline needs global ranks ordered by "
                                      "(stage, data-parallel rank) within a tensor rank")
        groups[t] = dist.new_group(ranks)
    scale = shape.head_dim ** -0.5
    return LockstepExchange(groups[coords[0]], p.dp, m.num_layers // p.pp,
                            (shape.h_q, shape.h_kv, shape.head_dim), runtime.kernel(scale), scale,
                            dtype, device, nano_batches=2 if cfg.cad.ping_pong else 1)


def stage_links(cfg: DistcaConfig, micro_batches: list[PackedBatch], dtype: torch.dtype,
                device: torch.device) -> StageLinks:
    """This stage's pipeline neighbours; activations are (T, 1, hidden) per micro-batch."""
    sizes = {b.tokens_per_rank for b in micro_batches}
    if len(sizes) > 1:
        raise ValueError(f"pipelined micro-batches need one tokens_per_rank, got {sorted(sizes)}")
    first = parallel_state.is_pipeline_first_stage()
    last = parallel_state.is_pipeline_last_stage()
    return StageLinks(
        None if first else parallel_state.get_pipeline_model_parallel_prev_rank(),
        None if last else parallel_state.get_pipeline_model_parallel_next_rank(),
        (sizes.pop() if sizes else 0, 1, cfg.model.hidden_size), dtype, device)


def start_lockstep_step(cfg: DistcaConfig, exchange: LockstepExchange,
                        micro_batches: list[PackedBatch], timetable, shape: ModelShape,
                        device: torch.device, training: bool) -> list[StepPlan]:
    """Plan the step's ticks (:func:`lockstep_plans`) and hand every job's placement (and,
    with ping-pong, its document cuts) to ``exchange`` (collective); returns the plans."""
    placements, plans = lockstep_plans(cfg, micro_batches, timetable, shape, device)
    tokens, cuts = micro_batches[0].tokens_per_rank, None
    if exchange.nanos == 2:  # a micro-batch's cuts serve the jobs of all its stages
        per_batch = [document_cuts(b.doc_lengths, b.turn_lengths, b.turn_is_context,
                                   cfg.parallel.dp, tokens) for b in micro_batches]
        cuts = {job: per_batch[job[1]] for job in placements}
    exchange.start_step(placements, tokens, training, cuts)
    return plans


def lockstep_plans(cfg: DistcaConfig, micro_batches: list[PackedBatch], timetable,
                   shape: ModelShape, device: torch.device) -> tuple[dict, list[StepPlan]]:
    """One plan per forward tick over the tick's jobs and all ``dp * pp`` ranks of the
    exchange (collective, in tick order); returns every job's placement and the plans."""
    c, dp = cfg.cad, cfg.parallel.dp
    tokens = micro_batches[0].tokens_per_rank
    group_size = dp * cfg.parallel.pp
    placements, plans = {}, []
    for row in timetable:
        jobs = [(s, op[1]) for s, op in enumerate(row) if op is not None and op[0] == "F"]
        if not jobs:
            continue
        batches = [micro_batches[i] for _, i in jobs]
        for b in batches:
            if b.num_ranks != dp:
                raise ValueError(f"micro-batch has {b.num_ranks} worker slices, "
                                 f"parallel.dp = {dp}")
        tick = tick_documents([(b.doc_lengths, b.turn_lengths, b.turn_is_context)
                               for b in batches], dp * tokens)
        plan = disaggregated_plan(tick.doc_lengths, tick.turn_lengths, tick.turn_is_context,
                                  len(jobs) * dp, tokens, c.tolerance, c.min_shard_tokens,
                                  shape, device, num_servers=group_size,
                                  buffer_budget_mb=c.buffer_budget_mb)
        active = [s * dp + d for s, _ in jobs for d in range(dp)]
        placements.update(zip(jobs, split_placement(plan.servers, tick, active, group_size)))
        plans.append(plan)
    return placements, plans
