"""Plans and exchanges of a step, chosen once from the config (design §5).

:class:`ExchangeFactory` is the one place that decides how attention travels:

* ``pp = 1``: one plan per micro-batch (colocated: every task on the worker holding its
  queries; disaggregated: balanced over the exchange group, computed on global rank 0 and
  broadcast), and per micro-batch a :class:`~distca.parallel.exchange.BlockingExchange`,
  :class:`~distca.parallel.exchange.TaskPingPong` or
  :class:`~distca.parallel.exchange.TokenPingPong` (:meth:`ExchangeFactory.kind`);
* ``pp > 1`` with disaggregated attention: the lock-step pipeline, one plan per forward tick
  over all ``dp × pp`` ranks of a tensor rank (:meth:`ExchangeFactory.start_lockstep`), so
  ranks in the pipeline bubble serve the other stages' attention; one exchange for the whole
  step (:class:`~distca.parallel.exchange.LockstepRounds` or ``LockstepPingPong``). FocuSFT
  aside (:func:`~distca.mesh.lockstep_pipeline`): its inner loop runs the adapted stages
  only, so each stage takes the ``pp = 1`` plans and exchanges within its data-parallel group.
"""

from __future__ import annotations

import enum

import torch

from distca.batch import PackedBatch
from distca.config import DistcaConfig
from distca.config_choices import PipelinePlan
from distca.mesh import ProcessMesh, dedicated_server_count, lockstep_pipeline
from distca.model.runtime import AttentionRuntime
from distca.parallel.exchange import (
    BlockingExchange,
    Exchange,
    LockstepPingPong,
    LockstepRounds,
    TaskPingPong,
    TokenPingPong,
)
from distca.parallel.lockstep import LockstepExchange, split_placement, tick_documents
from distca.parallel.nanobatch import document_cuts, nano_batches
from distca.parallel.planning import StepPlan, colocated_plan, disaggregated_plan
from distca.parallel.spans import span
from distca.scheduler.pipeline_sim import FORWARD, TickRow
from distca.shapes import plan_shape


class ExchangeKind(enum.Enum):
    blocking = "blocking"  # one all-to-all out and back per layer
    task_pingpong = "task_pingpong"  # each server's tasks in two halves
    token_pingpong = "token_pingpong"  # two token nano-batches, layers staggered
    lockstep = "lockstep"  # pipeline rounds, blocking
    lockstep_pingpong = "lockstep_pingpong"  # pipeline rounds, two token nano-batches


class ExchangeFactory:
    """Builds this rank's plans and exchanges (module docstring); collective where it plans."""

    def __init__(self, cfg: DistcaConfig, mesh: ProcessMesh, runtime: AttentionRuntime,
                 dtype: torch.dtype) -> None:
        self.cfg, self.mesh = cfg, mesh
        self.shape = plan_shape(cfg)
        self.kind = self._kind()
        self.rounds: LockstepExchange | None = None
        if self.kind in (ExchangeKind.lockstep, ExchangeKind.lockstep_pingpong):
            s = self.shape
            scale = s.head_dim ** -0.5
            self.rounds = LockstepExchange(
                mesh.lockstep, mesh.dp, cfg.model.num_layers // mesh.pp,
                (s.h_q, s.h_kv, s.head_dim), runtime.kernel(scale), scale, dtype, mesh.device,
                nano_batches=2 if self.kind is ExchangeKind.lockstep_pingpong else 1)

    def _kind(self) -> ExchangeKind:
        c = self.cfg.cad
        if lockstep_pipeline(self.cfg):
            return ExchangeKind.lockstep_pingpong if c.ping_pong else ExchangeKind.lockstep
        if not (c.enabled and c.ping_pong):
            return ExchangeKind.blocking
        # Token nano-batches overlap the exchange with the linear layers. FocuSFT's bilevel
        # step keeps the task split (its SFT-equivalence is measured against that layout), and
        # with one rank in the exchange there is no communication to hide.
        if self.mesh.exchange_size > 1 and not self.cfg.focusft.enabled:
            return ExchangeKind.token_pingpong
        return ExchangeKind.task_pingpong

    @property
    def pipelined(self) -> bool:
        """Whether the step runs the lock-step pipeline (one exchange for the whole step)."""
        return self.rounds is not None

    # ---- pp = 1: one plan and one exchange per micro-batch ----------------------------------
    def plan(self, batch: PackedBatch) -> StepPlan:
        """The micro-batch's plan (collective with disaggregated attention)."""
        if batch.num_ranks != self.cfg.parallel.dp:
            raise ValueError(f"micro-batch has {batch.num_ranks} worker slices, "
                             f"parallel.dp = {self.cfg.parallel.dp}")
        docs = batch.documents()
        if not self.cfg.cad.enabled:
            return colocated_plan(docs, batch.num_ranks, batch.tokens_per_rank)
        c = self.cfg.cad
        with span("plan"):
            return disaggregated_plan(docs, batch.num_ranks, batch.tokens_per_rank, c.tolerance,
                                      c.min_shard_tokens, self.shape, self.mesh.device,
                                      num_servers=batch.num_ranks
                                      + dedicated_server_count(self.cfg),
                                      buffer_budget_mb=c.buffer_budget_mb)

    def exchange(self, plan: StepPlan | None, batch: PackedBatch, blocking: bool = False
                 ) -> Exchange:
        """This rank's exchange of ``batch`` under ``plan`` (the lock-step one when pipelined);
        ``blocking`` asks for one exchange per layer over this stage's exchange group, whatever
        the ping-pong or lock-step setting (the attention-statistics forward, under a
        :meth:`plan`)."""
        kind = ExchangeKind.blocking if blocking else self.kind
        if kind is ExchangeKind.lockstep:
            return LockstepRounds(self.rounds)
        if kind is ExchangeKind.lockstep_pingpong:
            return LockstepPingPong(self.rounds)
        m, device = self.mesh, self.mesh.device
        rank, size, group = m.dp_rank, m.exchange_size, m.exchange
        if kind is ExchangeKind.token_pingpong:
            cuts = document_cuts(batch.documents(), batch.num_ranks, batch.tokens_per_rank)
            return TokenPingPong(nano_batches(plan.servers, cuts, rank, batch.num_ranks,
                                              batch.tokens_per_rank, size, device), group)
        layouts = plan.layouts(rank, batch.num_ranks, batch.tokens_per_rank, size,
                               kind is ExchangeKind.task_pingpong, device)
        if kind is ExchangeKind.task_pingpong:
            return TaskPingPong(layouts, group)
        return BlockingExchange(layouts, group)

    # ---- pp > 1 with disaggregated attention: the lock-step pipeline ------------------------
    def start_lockstep(self, micro_batches: list[PackedBatch], timetable: list[TickRow],
                       training: bool) -> list[StepPlan]:
        """Plan the step's ticks and hand every job's placement (and, with ping-pong, its
        document cuts) to the lock-step exchange (collective); returns the plans."""
        with span("plan"):
            placements, plans = self._tick_plans(micro_batches, timetable)
        tokens, cuts = micro_batches[0].tokens_per_rank, None
        if self.rounds.nanos == 2:  # a micro-batch's cuts serve the jobs of all its stages
            per_batch = [document_cuts(b.documents(), self.cfg.parallel.dp, tokens)
                         for b in micro_batches]
            cuts = {job: per_batch[job[1]] for job in placements}
        self.rounds.start_step(placements, tokens, training, cuts)
        return plans

    def _tick_plans(self, micro_batches: list[PackedBatch], timetable: list[TickRow]
                    ) -> tuple[dict, list[StepPlan]]:
        """One plan per forward tick over the tick's jobs (``cad.pipeline_plan=tick``) or per
        job (``job``), over all ``dp * pp`` ranks of the lock-step group (collective, in tick
        order); every job's placement and the plans."""
        c, dp = self.cfg.cad, self.cfg.parallel.dp
        tokens = micro_batches[0].tokens_per_rank
        group_size = dp * self.cfg.parallel.pp
        placements, plans = {}, []
        groups = []  # the jobs planned together, in tick order
        for row in timetable:
            jobs = [(s, op.micro_batch) for s, op in enumerate(row)
                    if op is not None and op.kind is FORWARD]
            if jobs:
                groups += [[job] for job in jobs] if c.pipeline_plan is PipelinePlan.job \
                    else [jobs]
        for jobs in groups:
            batches = [micro_batches[i] for _, i in jobs]
            for b in batches:
                if b.num_ranks != dp:
                    raise ValueError(f"micro-batch has {b.num_ranks} worker slices, "
                                     f"parallel.dp = {dp}")
            tick = tick_documents([b.documents() for b in batches], dp * tokens)
            plan = disaggregated_plan(tick.documents, len(jobs) * dp, tokens, c.tolerance,
                                      c.min_shard_tokens, self.shape, self.mesh.device,
                                      num_servers=group_size, buffer_budget_mb=c.buffer_budget_mb)
            active = [s * dp + d for s, _ in jobs for d in range(dp)]
            placements.update(zip(jobs, split_placement(plan.servers, tick, active, group_size)))
            plans.append(plan)
        return placements, plans
