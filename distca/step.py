"""One rank's training step, written once for workers and dedicated attention servers.

Every rank receives the same list of :class:`~distca.batch.PackedBatch` micro-batches per step
and works on its own tokens (the role's rows: a worker's data-parallel slice, none on a
dedicated server). The loss is the global mean over all loss tokens of the step: each worker
back-propagates ``(sum of its token losses) / (global loss-token count)`` and gradients are
summed over the data-parallel workers, which makes the result exactly that of one process
training on the whole batch.

The schedule of a step, in collective order:

1. plans: one per micro-batch (``pp = 1``; global rank 0 plans, all ranks receive it), or one
   per forward tick of the lock-step pipeline (``pp > 1`` with disaggregated attention);
2. per micro-batch, the stage forward through the micro-batch's exchange and its backward
   (``pp = 1``), or the pipeline schedule: 1F1B with colocated attention
   (:func:`~distca.parallel.pipeline.run_1f1b`), the lock-step ticks with disaggregated
   attention (:func:`~distca.parallel.pipeline.run_lockstep`), where ranks in the pipeline
   bubble serve the other stages' attention;
3. gradient all-reduce over the workers (fp32), global grad norm, optimizer step;
4. every ``attention.telemetry_interval`` steps, the telemetry all-reduce over all ranks.

A dedicated server runs this same code with an attention-only stage (:mod:`distca.roles`):
its layers join every exchange of the step, and a collective over a group it is not in
(:meth:`ProcessMesh.all_reduce_grads`) is a no-op for it. So a collective added to the step
reaches the servers without server code.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.distributed as dist

from distca.attention import AttentionStats
from distca.batch import IGNORE, PackedBatch, loss_token_count
from distca.config import DistcaConfig
from distca.config_choices import CHAT_KINDS
from distca.exchanges import ExchangeFactory
from distca.mesh import ProcessMesh
from distca.model.probe import AttentionProbe, probe_rows
from distca.model.runtime import AttentionRuntime
from distca.model.staggered import stage_forward
from distca.optimizer import buckets
from distca.parallel.pipeline import StageLinks, run_1f1b, run_forward_only, run_lockstep
from distca.parallel.planning import StepPlan
from distca.roles import compute_dtype, make_role
from distca.scheduler.pipeline_sim import lockstep_ticks


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


class Step:
    """A rank's step (module docstring): build with :func:`distca.rank.make_rank`."""

    fast_layers = 0  # top layers with FocuSFT fast weights (set by FocusftStep)

    def __init__(self, cfg: DistcaConfig, mesh: ProcessMesh) -> None:
        self.cfg, self.mesh = cfg, mesh
        self.device = mesh.device
        self.runtime = AttentionRuntime(cfg.model.rope_theta, cfg.attention.backend.value,
                                        cfg.model.rope_scaling)
        self.role = make_role(cfg, mesh, self.runtime, self.fast_layers)
        self.stage = self.role.stage
        self.exchanges = ExchangeFactory(cfg, mesh, self.runtime, compute_dtype(cfg))
        self.step = 0

    # a worker's model, trainable tensors and optimizer (a dedicated server has none)
    @property
    def model(self):
        return self.role.model

    @property
    def params(self) -> list[torch.Tensor]:
        return self.role.params

    @property
    def optimizer(self):
        return self.role.optimizer

    # ---- one micro-batch -------------------------------------------------------------------
    def load(self, batch: PackedBatch, plan: StepPlan | None, blocking: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Point the runtime at ``batch``'s exchange (``blocking``: one exchange per layer,
        whatever the config's ping-pong); this rank's tokens, labels (IGNORE replaced by 0) and
        loss mask, each (1, T)."""
        rows = self.role.rows(batch)
        tokens = rank_rows(batch.tokens, rows, self.device)
        labels = rank_rows(batch.labels, rows, self.device)
        positions = torch.as_tensor(batch.position_ids()[rows], device=self.device)
        self.runtime.set_batch(positions, self.exchanges.exchange(plan, batch, blocking))
        mask = labels != IGNORE
        return tokens, torch.where(mask, labels, 0), mask

    def forward(self, batch: PackedBatch, plan: StepPlan | None,
                hidden_in: torch.Tensor | None = None, blocking: bool = False) -> torch.Tensor:
        """This stage's forward of this rank's tokens: on the last pipeline stage the sum of
        its token losses (fp32 scalar, differentiable), else the hidden states (T, 1, H) for
        the next stage. ``hidden_in``: the previous stage's output (None on the first)."""
        tokens, labels, mask = self.load(batch, plan, blocking)
        if not self.stage.post_process:
            return stage_forward(self.stage, self.runtime, tokens, hidden_in, None)
        out = stage_forward(self.stage, self.runtime, tokens, hidden_in, labels)
        return (out.float() * mask).sum()

    def links(self, micro_batches: list[PackedBatch]) -> StageLinks:
        """This stage's pipeline neighbours; activations are (T, 1, hidden) per micro-batch."""
        sizes = {b.tokens_per_rank for b in micro_batches}
        if len(sizes) > 1:
            raise ValueError(f"pipelined micro-batches need one tokens_per_rank, "
                             f"got {sorted(sizes)}")
        dtype = compute_dtype(self.cfg)
        tokens = sizes.pop() if sizes else 0
        if self.cfg.parallel.sequence_parallel:  # each TP rank sends its rows
            tokens //= self.mesh.tp
        return StageLinks(*self.mesh.neighbours(), (tokens, 1, self.cfg.model.hidden_size),
                          dtype, self.device)

    # ---- the public step API ---------------------------------------------------------------
    def train_step(self, micro_batches: list[PackedBatch]) -> dict[str, float]:
        """One optimizer step over ``micro_batches`` (the same list on every rank)."""
        start = time.perf_counter()
        n = self.cfg.attention.telemetry_interval
        # the statistics of the weights that make this step's loss
        measure = n and self.step % n == 0
        telemetry = self.attention_statistics(micro_batches) if measure else {}
        stats = self.forward_backward(micro_batches)
        loss = stats["loss"]
        grad_norm = self._grad_norm()
        lr = learning_rate(self.cfg, self.step)
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if not skipped and self.role.optimizer is not None:
            clip = self.cfg.optim.grad_clip
            if clip > 0 and grad_norm > clip:
                for q in self.role.params:
                    q.grad.mul_(clip / (grad_norm + 1e-6))
            self.role.optimizer.step(lr)
        self.step += 1
        stats.update(tokens=float(sum(b.doc_lengths.sum() for b in micro_batches)),
                     step_time_s=time.perf_counter() - start, lr=lr, grad_norm=grad_norm,
                     skipped=float(skipped))
        stats.update(telemetry)
        return stats

    def _begin(self) -> None:
        """Training mode and zeroed gradients before a step's forward and backward."""
        if self.role.optimizer is not None:
            self.role.model.train()
            self.role.optimizer.zero_grad()

    def forward_backward(self, micro_batches: list[PackedBatch]) -> dict[str, float]:
        """Loss and data-parallel-summed gradients in ``.grad``, no update.

        Returns loss (global mean over loss tokens) and the mean attention imbalance (max/mean
        server cost) of the micro-batches' plans before and after planning.
        """
        self._begin()
        total = max(loss_token_count(micro_batches), 1)
        losses = []  # this rank's loss sum per micro-batch (last pipeline stage only)
        stats = {}
        pipelined = self.exchanges.pipelined
        if pipelined:
            timetable = lockstep_ticks(self.mesh.pp, len(micro_batches))
            plans = self.exchanges.start_lockstep(micro_batches, timetable, True)
        else:
            # Every rank joins every plan broadcast, in micro-batch order, before any stage runs.
            plans = [self.exchanges.plan(batch) for batch in micro_batches]

        def stage_forward_of(i: int, hidden_in: torch.Tensor | None) -> torch.Tensor:
            out = self.forward(micro_batches[i], None if pipelined else plans[i], hidden_in)
            if not self.stage.post_process:
                return out
            losses.append(out.detach())
            return out / total

        if pipelined:
            run_lockstep(stage_forward_of, timetable, self.mesh.pp_rank, self.links(micro_batches),
                         self.exchanges.rounds)
            # score pairs this rank served while its own stage was in the pipeline bubble
            stats["bubble_served_pairs"] = float(self.exchanges.rounds.bubble_pairs)
        elif self.mesh.pp == 1:
            for i in range(len(micro_batches)):
                stage_forward_of(i, None).backward()
        else:
            run_1f1b(stage_forward_of, len(micro_batches), self.mesh.pp_rank, self.mesh.pp,
                     self.links(micro_batches))
        self._sync_gradients()
        return {"loss": self._global_loss_sum(losses) / total, **plan_stats(plans), **stats}

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[PackedBatch]) -> float:
        """Global mean loss over the loss tokens of ``micro_batches``; no gradients, no update."""
        if self.role.optimizer is not None:
            self.role.model.eval()
        links = self.links(micro_batches)
        if self.exchanges.pipelined:
            timetable = lockstep_ticks(self.mesh.pp, len(micro_batches), backward=False)
            self.exchanges.start_lockstep(micro_batches, timetable, False)
            losses = []

            def forward(i: int, hidden: torch.Tensor | None) -> torch.Tensor:
                out = self.forward(micro_batches[i], None, hidden)
                if self.stage.post_process:
                    losses.append(out.detach())
                return out

            run_lockstep(forward, timetable, self.mesh.pp_rank, links, self.exchanges.rounds,
                         train=False)
        else:
            plans = [self.exchanges.plan(batch) for batch in micro_batches]
            losses = run_forward_only(
                lambda i, hidden: self.forward(micro_batches[i], plans[i], hidden),
                len(micro_batches), links)
        return self._global_loss_sum(losses) / max(loss_token_count(micro_batches), 1)

    def _global_loss_sum(self, losses: list[torch.Tensor]) -> float:
        """Sum of the step's token losses over data-parallel ranks, known to every stage."""
        loss_sum = torch.zeros((), dtype=torch.float64)
        for x in losses:
            loss_sum += x.double().cpu()
        if self.mesh.pp > 1:  # only the last stage has losses; the others add zero
            dist.all_reduce(loss_sum, group=self.mesh.pp_group)
        self.mesh.all_reduce_grads(loss_sum)
        return float(loss_sum)

    # ---- gradients -------------------------------------------------------------------------
    def _sync_gradients(self) -> None:
        """Sum gradients over the data-parallel workers, in fp32 (with bf16 gradients every
        partial sum would round) and in buckets (:func:`distca.optimizer.buckets`)."""
        params = self.role.params
        for q in params:
            if q.grad is None:
                q.grad = torch.zeros_like(q)
        sharded_rows = [q.grad for q in params if getattr(q, "sequence_parallel", False)]
        if sharded_rows and self.mesh.tp > 1:  # sequence-parallel norms saw 1/tp of the rows
            flat = torch.cat([g.reshape(-1).float() for g in sharded_rows])
            dist.all_reduce(flat, group=self.mesh.tp_group)
            offset = 0
            for g in sharded_rows:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        if params and self.mesh.dp > 1:
            # summed in fp32 (with bf16 gradients every partial sum would round), in buckets
            for bucket in buckets([q.numel() for q in params]):
                flat = torch.cat([params[i].grad.view(-1)[a:b].float() for i, a, b in bucket])
                self.mesh.all_reduce_grads(flat)
                offset = 0
                for i, a, b in bucket:
                    params[i].grad.view(-1)[a:b].copy_(flat[offset:offset + b - a])
                    offset += b - a
        if self.role.tied is not None:  # tied embedding copies on the first and last stage
            dist.all_reduce(self.role.tied.grad, group=self.role.tied_group)

    def _grad_norm(self) -> float:
        """Global L2 norm: tensor-parallel shards summed over the TP group, replicas once,
        pipeline stages summed."""
        sharded = torch.zeros((), dtype=torch.float64, device=self.device)
        replicated = torch.zeros((), dtype=torch.float64, device=self.device)
        for q in self.role.params:
            if q is self.role.tied and not self.mesh.is_first_stage:
                continue  # the last stage's copy of the tied embedding
            sq = q.grad.double().pow(2).sum()
            if getattr(q, "tensor_model_parallel", False):
                sharded += sq
            else:
                replicated += sq
        if self.mesh.tp > 1:
            dist.all_reduce(sharded, group=self.mesh.tp_group)
        total = sharded + replicated
        if self.mesh.pp > 1:
            dist.all_reduce(total, group=self.mesh.pp_group)
        return math.sqrt(float(total))

    # ---- attention statistics -------------------------------------------------------------
    @torch.no_grad()
    def attention_statistics(self, micro_batches: list[PackedBatch]) -> dict[str, float]:
        """First-token, context and learnable-sink mass and sink rate of ``micro_batches``
        under the current weights (:mod:`distca.model.probe`): one extra forward, no update,
        through blocking exchanges (with pp > 1 stage after stage, each stage's probe adding
        its own layers); collective on every rank, dedicated servers included.
        FocuSFT's fast weights are inactive here: the statistics are the base model's."""
        m, mesh = self.cfg.model, self.mesh
        heads = m.num_attention_heads // mesh.tp
        chat = self.cfg.data.kind in CHAT_KINDS
        stats = AttentionStats(m.num_layers, m.num_attention_heads, self.device,
                               has_context=chat, has_sinks=m.learnable_sinks)
        probe = AttentionProbe(stats, mesh.tp_rank * heads,
                               mesh.pp_rank * (m.num_layers // mesh.pp), mesh.exchange,
                               mesh.tp_rank == 0, self.device)
        # Every rank joins every plan broadcast, in micro-batch order, before any stage runs.
        # With pp > 1 each stage's exchanges (and the probe's collectives) stay within its own
        # data-parallel group: stage by stage, no lock-step rounds.
        plans = [self.exchanges.plan(batch) for batch in micro_batches]

        def forward(i: int, hidden_in: torch.Tensor | None) -> torch.Tensor:
            batch = micro_batches[i]
            probe.start_micro_batch(probe_rows(batch, self.role.rows(batch), chat, self.device))
            return self.forward(batch, plans[i], hidden_in, blocking=True)

        self.runtime.probe = probe
        try:
            run_forward_only(forward, len(micro_batches), self.links(micro_batches))
        finally:
            self.runtime.probe = None
        stats.all_reduce()  # every rank, servers included (they add zeros)
        return stats.metrics()

    # ---- the whole (TP=1, PP=1) model view, for parity checks and conversions --------------
    def full_model_state(self) -> dict[str, torch.Tensor]:
        """Every weight of the whole model under TP=1/PP=1 names (collective over workers)."""
        return self.role.gather(dict(self.role.model.named_parameters()))

    def load_full_model_state(self, full: dict[str, torch.Tensor]) -> None:
        """Load this rank's shard of whole-model weights from :meth:`full_model_state`."""
        self.role.load_full(full)


def plan_stats(plans: list[StepPlan]) -> dict[str, float]:
    """Mean attention imbalance of a step's plans before and after planning."""
    return {"imbalance_before": float(np.mean([p.imbalance_before for p in plans])),
            "imbalance": float(np.mean([p.imbalance for p in plans]))}


def rank_rows(array: np.ndarray, rows: slice, device: torch.device) -> torch.Tensor:
    """(1, T) copy of this rank's ``rows`` of a batch array: a batch that came through Ray is
    read-only, which ``torch.as_tensor`` would share (and warn about)."""
    return torch.tensor(array[rows], device=device).view(1, -1)
