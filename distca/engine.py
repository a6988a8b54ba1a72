"""The training engine of one rank: megatron-core model, disaggregated attention, optimizer.

Construct it inside each rank's process after ``torch.distributed.init_process_group``; every
rank then receives the same list of :class:`~distca.batch.PackedBatch` micro-batches per step and
works on its own slice (``batch.rank_slice(dp_rank)``). The loss is the global mean over all loss
tokens of the step: each rank back-propagates ``(sum of its token losses) / (global loss-token
count)`` and gradients are summed over data-parallel ranks, which makes the result exactly that
of one process training on the whole batch.

Tensor and pipeline parallelism (layout in :mod:`distca.model.sharding`): megatron-core splits
heads, FFN and vocabulary over the ``parallel.tp`` ranks of a tensor-parallel group and layers
over ``parallel.pp`` pipeline stages. Every rank of a (tensor rank, stage) pair's data-parallel
group exchanges CA-tasks with the others in that group, with the one plan of the micro-batch
(computed on global rank 0 and broadcast to all ranks before the step). With ``pp > 1`` the
micro-batches run through :func:`distca.parallel.pipeline.run_1f1b` with colocated attention
and through the lock-step schedule (:func:`distca.parallel.pipeline.run_lockstep`) with
disaggregated attention: all ``dp * pp`` ranks of a tensor rank join every attention exchange,
one plan per tick over all of them, so ranks in the pipeline bubble serve the other stages'
attention (:mod:`distca.parallel.lockstep`; glue in :mod:`distca.pipeline_glue`).

Ping-pong (``cad.ping_pong=true`` with disaggregated attention): each stage forward runs its
layers as two staggered token nano-batches (:mod:`distca.model.staggered`), so one
nano-batch's exchange overlaps the other's linear layers, in forward and backward (in the
lock-step schedule too).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from distca.attention_server import (
    AttentionServer,
    exchange_layout,
    is_server_rank,
    join_runtime,
    plan_micro_batch,
)
from distca.batch import PackedBatch
from distca.config import DistcaConfig
from distca.model import AttentionRuntime, build_model
from distca.model.core_attention import SinkTelemetry
from distca.model.cpu_shims import seed_model_parallel
from distca.model.sharding import gather_full, load_full
from distca.model.staggered import staggered_stage_forward
from distca.optimizer import Optimizer
from distca.parallel.nanobatch import NanoBatches
from distca.parallel.pipeline import (
    StageLinks,
    lockstep_timetable,
    run_1f1b,
    run_forward_only,
    run_lockstep,
)
from distca.parallel.planning import StepPlan, colocated_plan
from distca.pipeline_glue import lockstep_exchange, stage_links, start_lockstep_step
from distca.scheduler import ModelShape

IGNORE = -100


def learning_rate(cfg: DistcaConfig, step: int) -> float:
    """Linear warm-up then cosine (or constant) decay from ``optim.lr`` to ``optim.min_lr``."""
    o, total = cfg.optim, cfg.trainer.steps
    warmup = int(o.warmup_fraction * total)
    if step < warmup:
        return o.lr * (step + 1) / warmup
    if o.schedule == "constant":
        return o.lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1.0 + math.cos(math.pi * progress))


class Engine:
    """One rank's model replica/shard and its training step (see the module docstring).

    On the ranks of dedicated attention servers (``cad.server_mode=dedicated``, ranks after the
    workers) ``Engine(cfg)`` returns a :class:`distca.attention_server.AttentionServer`.
    """

    def __new__(cls, cfg: DistcaConfig):
        if dist.is_initialized() and is_server_rank(cfg, dist.get_rank()):
            return AttentionServer(cfg)
        return super().__new__(cls)

    def __init__(self, cfg: DistcaConfig) -> None:
        if not dist.is_initialized():
            raise RuntimeError("Engine needs torch.distributed.init_process_group first")
        p = cfg.parallel
        self.cfg = cfg
        # exchange_group adds dedicated attention servers to the data-parallel workers
        self.device, self.dp_group, self.exchange_group = join_runtime(cfg)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.pp_group = parallel_state.get_pipeline_model_parallel_group()
        self.pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        self.layer_offset = self.pp_rank * (cfg.model.num_layers // p.pp)
        seed_model_parallel(cfg.trainer.seed, self.tp_rank)
        self.runtime = AttentionRuntime(cfg.model.rope_theta, cfg.attention.backend.value,
                                        group=self.exchange_group)
        self.model = build_model(cfg.model, self.runtime, cfg.trainer.precision)
        self.is_first_stage = parallel_state.is_pipeline_first_stage()
        self.is_last_stage = parallel_state.is_pipeline_last_stage()
        self.params = [q for q in self.model.parameters() if q.requires_grad]
        self.optimizer = Optimizer(self.params, cfg.optim, self.dp_group)
        m, tp = cfg.model, p.tp
        self.plan_shape = ModelShape(h_q=m.num_attention_heads // tp, h_kv=m.num_kv_heads // tp,
                                     head_dim=m.hidden_size // m.num_attention_heads,
                                     bytes_per_elem=2 if cfg.trainer.precision.value == "bf16" else 4)
        self.lockstep = None
        if p.pp > 1 and cfg.cad.enabled:
            self.lockstep = lockstep_exchange(cfg, (self.tp_rank, self.pp_rank, self.dp_rank),
                                              self.plan_shape, self.runtime,
                                              self.model.config.params_dtype, self.device)
        self.step = 0

    # ---- one micro-batch -------------------------------------------------------------------
    def _plan(self, batch: PackedBatch) -> StepPlan:
        """The micro-batch's plan: computed on global rank 0 and broadcast to every rank."""
        if batch.num_ranks != self.cfg.parallel.dp:
            raise ValueError(f"micro-batch has {batch.num_ranks} worker slices, "
                             f"parallel.dp = {self.cfg.parallel.dp}")
        if not self.cfg.cad.enabled:
            return colocated_plan(batch.doc_lengths, batch.turn_lengths, batch.turn_is_context,
                                  batch.num_ranks, batch.tokens_per_rank)
        return plan_micro_batch(self.cfg, batch, self.plan_shape, self.device)

    def _forward(self, batch: PackedBatch, plan: StepPlan,
                 hidden_in: torch.Tensor | None = None) -> torch.Tensor:
        """This stage's forward of this rank's tokens.

        On the last pipeline stage: the sum of the rank's token losses (fp32 scalar,
        differentiable). On earlier stages: the hidden states (T, 1, hidden) for the next stage.
        ``hidden_in`` is the previous stage's output (None on the first stage).
        """
        rows = batch.rank_slice(self.dp_rank)
        tokens = rank_rows(batch.tokens, rows, self.device)
        positions = torch.as_tensor(batch.position_ids()[rows], device=self.device)
        layout = self._layout(batch, plan) if self.lockstep is None else self.lockstep
        self.runtime.set_batch(positions, layout)
        labels = mask = None
        if self.is_last_stage:
            labels = rank_rows(batch.labels, rows, self.device)
            mask = labels != IGNORE
            labels = torch.where(mask, labels, 0)
        if isinstance(layout, NanoBatches) or (layout is self.lockstep
                                               and self.lockstep.nanos == 2):
            out = staggered_stage_forward(self.model, self.runtime, tokens, hidden_in, labels)
        else:
            if not self.is_first_stage:
                self.model.set_input_tensor(hidden_in)
            out = self.model(tokens, None, None, labels=labels)
        return out if mask is None else (out.float() * mask).sum()

    def _links(self, micro_batches: list[PackedBatch]) -> StageLinks:
        return stage_links(self.cfg, micro_batches, self.model.config.pipeline_dtype, self.device)

    def _start_lockstep(self, micro_batches: list[PackedBatch], timetable,
                        training: bool) -> list[StepPlan]:
        return start_lockstep_step(self.cfg, self.lockstep, micro_batches, timetable,
                                   self.plan_shape, self.device, training)

    def _layout(self, batch: PackedBatch, plan: StepPlan):
        """This rank's exchange: one layout, task nano-batch layouts or token nano-batches
        (:func:`distca.attention_server.exchange_layout`)."""
        return exchange_layout(self.cfg, plan, batch, self.dp_rank,
                               dist.get_world_size(self.exchange_group), self.device)

    # ---- the public step API ---------------------------------------------------------------
    def train_step(self, micro_batches: list[PackedBatch]) -> dict[str, float]:
        """One optimizer step over ``micro_batches`` (the same list on every rank)."""
        start = time.perf_counter()
        telemetry = self._telemetry_on()
        self.runtime.telemetry = SinkTelemetry() if telemetry else None
        stats = self.forward_backward(micro_batches)
        loss = stats["loss"]
        grad_norm = self._grad_norm()
        lr = learning_rate(self.cfg, self.step)
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if not skipped:
            clip = self.cfg.optim.grad_clip
            if clip > 0 and grad_norm > clip:
                for q in self.params:
                    q.grad.mul_(clip / (grad_norm + 1e-6))
            self.optimizer.step(lr)
        self.step += 1
        stats.update(tokens=float(sum(b.doc_lengths.sum() for b in micro_batches)),
                     step_time_s=time.perf_counter() - start, lr=lr, grad_norm=grad_norm,
                     skipped=float(skipped))
        if telemetry:
            stats.update(self._telemetry_stats())
        self.runtime.telemetry = None
        return stats

    def forward_backward(self, micro_batches: list[PackedBatch]) -> dict[str, float]:
        """Loss and data-parallel-summed gradients in ``.grad``, no update.

        Returns loss (global mean over loss tokens) and the mean attention imbalance (max/mean
        server cost) of the micro-batches' plans before and after planning.
        """
        self.model.train()
        self.optimizer.zero_grad()
        total = max(_loss_tokens(micro_batches), 1)
        losses = []  # this rank's loss sum per micro-batch (last pipeline stage only)
        stats = {}
        if self.lockstep is not None:
            timetable = lockstep_timetable(self.cfg.parallel.pp, len(micro_batches))
            plans = self._start_lockstep(micro_batches, timetable, True)
        else:
            # Every rank joins every plan broadcast, in micro-batch order, before any stage runs.
            plans = [self._plan(batch) for batch in micro_batches]

        def stage_forward(i: int, hidden_in: torch.Tensor | None) -> torch.Tensor:
            out = self._forward(micro_batches[i], None if self.lockstep else plans[i], hidden_in)
            if not self.is_last_stage:
                return out
            losses.append(out.detach())
            return out / total

        if self.lockstep is not None:
            run_lockstep(stage_forward, timetable, self.pp_rank, self._links(micro_batches),
                         self.lockstep)
            # score pairs this rank served while its own stage was in the pipeline bubble
            stats["bubble_served_pairs"] = float(self.lockstep.bubble_pairs)
        elif self.cfg.parallel.pp == 1:
            for i in range(len(micro_batches)):
                stage_forward(i, None).backward()
        else:
            run_1f1b(stage_forward, len(micro_batches), self.pp_rank, self.cfg.parallel.pp,
                     self._links(micro_batches))
        self._sync_gradients()
        return {"loss": self._global_loss_sum(losses) / total,
                "imbalance_before": float(np.mean([p.imbalance_before for p in plans])),
                "imbalance": float(np.mean([p.imbalance for p in plans])), **stats}

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[PackedBatch]) -> float:
        """Global mean loss over the loss tokens of ``micro_batches``; no gradients, no update."""
        self.model.eval()
        links = self._links(micro_batches)
        if self.lockstep is not None:
            timetable = lockstep_timetable(self.cfg.parallel.pp, len(micro_batches), backward=False)
            self._start_lockstep(micro_batches, timetable, False)
            losses = []

            def forward(i: int, hidden: torch.Tensor | None) -> torch.Tensor:
                out = self._forward(micro_batches[i], None, hidden)
                if self.is_last_stage:
                    losses.append(out.detach())
                return out

            run_lockstep(forward, timetable, self.pp_rank, links, self.lockstep, train=False)
            return self._global_loss_sum(losses) / max(_loss_tokens(micro_batches), 1)
        plans = [self._plan(batch) for batch in micro_batches]
        losses = run_forward_only(lambda i, hidden: self._forward(micro_batches[i], plans[i], hidden),
                                  len(micro_batches), links)
        return self._global_loss_sum(losses) / max(_loss_tokens(micro_batches), 1)

    def _global_loss_sum(self, losses: list[torch.Tensor]) -> float:
        """Sum of the step's token losses over data-parallel ranks, known to every stage."""
        loss_sum = torch.zeros((), dtype=torch.float64)
        for x in losses:
            loss_sum += x.double().cpu()
        if self.cfg.parallel.pp > 1:  # only the last stage has losses; the others add zero
            dist.all_reduce(loss_sum, group=self.pp_group)
        return _all_reduce_scalar(loss_sum, self.dp_group)

    # ---- gradients -------------------------------------------------------------------------
    def _sync_gradients(self) -> None:
        for q in self.params:
            if q.grad is None:
                q.grad = torch.zeros_like(q)
        if self.cfg.parallel.dp == 1:
            return
        # summed in fp32: with bf16 gradients every partial sum would round
        flat = torch.cat([q.grad.reshape(-1).float() for q in self.params])
        dist.all_reduce(flat, group=self.dp_group)
        offset = 0
        for q in self.params:
            q.grad.copy_(flat[offset:offset + q.numel()].view_as(q))
            offset += q.numel()

    def _grad_norm(self) -> float:
        """Global L2 norm: tensor-parallel shards summed over the TP group, replicas once,
        pipeline stages summed."""
        sharded = torch.zeros((), dtype=torch.float64, device=self.device)
        replicated = torch.zeros((), dtype=torch.float64, device=self.device)
        for q in self.params:
            sq = q.grad.double().pow(2).sum()
            if getattr(q, "tensor_model_parallel", False):
                sharded += sq
            else:
                replicated += sq
        if self.cfg.parallel.tp > 1:
            dist.all_reduce(sharded, group=self.tp_group)
        total = sharded + replicated
        if self.cfg.parallel.pp > 1:
            dist.all_reduce(total, group=self.pp_group)
        return math.sqrt(float(total))

    # ---- telemetry -------------------------------------------------------------------------
    def _telemetry_on(self) -> bool:
        n = self.cfg.attention.telemetry_interval
        return n > 0 and self.cfg.model.learnable_sinks and self.step % n == 0

    def _telemetry_stats(self) -> dict[str, float]:
        t = self.runtime.telemetry
        # Every rank holds distinct (tokens, heads, layers): sum over all of them. Megatron's
        # layer numbers are global (1-based), so stages fill disjoint rows.
        layers = range(1, self.cfg.model.num_layers + 1)
        sums = torch.tensor([[t.mass_sum.get(i, 0.0), t.rows.get(i, 0)] for i in layers],
                            dtype=torch.float64)
        dist.all_reduce(sums)
        stats = {f"sink_mass_layer{i}": float(s / max(r, 1)) for i, (s, r) in zip(layers, sums)}
        stats["sink_mass"] = float(sums[:, 0].sum() / max(float(sums[:, 1].sum()), 1.0))
        return stats

    # ---- the full (TP=1, PP=1) model view, for parity checks and conversions ---------------
    def full_model_state(self) -> dict[str, torch.Tensor]:
        """Every weight of the whole model under TP=1/PP=1 names (collective; all ranks get it)."""
        return self._gather({n: q for n, q in self.model.named_parameters()})

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """Every parameter's ``.grad`` of the whole model under TP=1/PP=1 names (collective)."""
        return self._gather({n: q.grad for n, q in self.model.named_parameters()})

    def load_full_model_state(self, full: dict[str, torch.Tensor]) -> None:
        """Load this rank's shard of whole-model weights from :meth:`full_model_state`."""
        load_full(self.model, full, self.layer_offset, self.tp_rank, self.cfg.parallel.tp,
                  self.model.config.gated_linear_unit)
        self.optimizer.master_from_model()

    def _gather(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        p = self.cfg.parallel
        return gather_full(self.model, tensors, self.layer_offset, p.tp, self.tp_group, p.pp,
                           self.pp_group, self.model.config.gated_linear_unit)

    # ---- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's model shard, optimizer state (:meth:`Optimizer.state_dict`) and step as
        flat CPU tensors."""
        state = {f"model.{k}": v.detach().cpu().clone()
                 for k, v in self.model.state_dict().items() if isinstance(v, torch.Tensor)}
        state.update(self.optimizer.state_dict())
        state["step"] = torch.tensor(self.step, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        model_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        missing, unexpected = self.model.load_state_dict(model_state, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise KeyError(f"checkpoint does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
        self.optimizer.load_state_dict(state)
        self.step = int(state["step"])


def rank_rows(array: np.ndarray, rows: slice, device: torch.device) -> torch.Tensor:
    """(1, T) copy of this rank's ``rows`` of a batch array: a batch that came through Ray is
    read-only, which ``torch.as_tensor`` would share (and warn about)."""
    return torch.tensor(array[rows], device=device).view(1, -1)


def _loss_tokens(micro_batches: list[PackedBatch]) -> int:
    return int(sum((b.labels != IGNORE).sum() for b in micro_batches))


def _all_reduce_scalar(value: torch.Tensor, group) -> float:
    value = value.clone()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(value, group=group)
    return float(value)
