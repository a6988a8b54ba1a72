"""Dedicated attention servers: ranks that hold no tokens and no layers, only CA-tasks.

With ``cad.server_mode=dedicated`` the world is ``parallel.dp`` workers (ranks ``0..W-1``, each
also an in-place server) followed by ``cad.num_dedicated_servers`` server ranks. The planner
balances attention over all ``W + S`` servers; workers keep every token, servers keep none.
A server joins each layer's exchanges exactly like a worker with zero tokens: it receives q, k,
v of its tasks, computes out + lse, returns them, and in backward receives dO and returns dq,
dk, dv. Because it runs the same dispatch code with the same plan, its collectives line up
with the workers' in forward and backward (autograd replays layers in reverse creation order
on both sides).

Groups: the exchange group is every rank; gradients and losses are reduced over the workers
only. Dedicated servers are implemented for ``parallel.tp = parallel.pp = 1``.

With ``focusft.enabled`` a server mirrors the workers' bilevel step
(:mod:`distca.focusft.engine`): the layers below the first adapted layer's MLP once, then per
inner step a forward and backward of the adapted layers above it, then their outer forward
and one backward through everything.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from distca.batch import PackedBatch
from distca.config import DistcaConfig, ServerMode
from distca.focusft.fast_weights import top_layer_count
from distca.model import AttentionRuntime, apply_cpu_shims
from distca.parallel.layout import DispatchLayout
from distca.parallel.nanobatch import NanoBatches, document_cuts, nano_batches
from distca.parallel.planning import StepPlan, disaggregated_plan
from distca.scheduler import ModelShape


def num_dedicated_servers(cfg: DistcaConfig) -> int:
    """Server-only ranks after the workers (0 with in-place serving)."""
    c = cfg.cad
    return c.num_dedicated_servers if c.server_mode is ServerMode.dedicated else 0


def is_server_rank(cfg: DistcaConfig, rank: int) -> bool:
    return rank >= cfg.parallel.dp * cfg.parallel.tp * cfg.parallel.pp


def check_world(cfg: DistcaConfig) -> None:
    """The world must hold the workers plus the dedicated servers (the config's own limits,
    such as tp = pp = 1 with dedicated servers, are checked once, by :func:`distca.config.validate`)."""
    p, servers = cfg.parallel, num_dedicated_servers(cfg)
    world = dist.get_world_size()
    if world != p.dp * p.tp * p.pp + servers:
        raise ValueError(f"world size {world} != parallel.dp*tp*pp + dedicated servers = "
                         f"{p.dp * p.tp * p.pp} + {servers}")


def data_parallel_groups(cfg: DistcaConfig) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """(group for gradients and losses, group for attention exchanges); collective on every rank
    after ``initialize_model_parallel``. They differ only when dedicated servers exist: megatron
    then counts the servers as data-parallel ranks, and the first group leaves them out."""
    exchange = parallel_state.get_data_parallel_group()
    if not num_dedicated_servers(cfg):
        return exchange, exchange
    return dist.new_group(list(range(cfg.parallel.dp))), exchange


def join_runtime(cfg: DistcaConfig) -> tuple[torch.device, dist.ProcessGroup, dist.ProcessGroup]:
    """Set-up shared by workers and servers (collective): check the world, patch megatron for
    CPU, initialise its model-parallel state; returns (device, gradient group, exchange group)."""
    check_world(cfg)
    device = torch.device("cuda", torch.cuda.current_device()) \
        if torch.cuda.is_available() else torch.device("cpu")
    apply_cpu_shims()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(cfg.parallel.tp, cfg.parallel.pp)
    return (device, *data_parallel_groups(cfg))


def plan_micro_batch(cfg: DistcaConfig, batch: PackedBatch, shape: ModelShape,
                     device: torch.device) -> StepPlan:
    """The disaggregated plan of ``batch`` over workers and dedicated servers (collective)."""
    c = cfg.cad
    return disaggregated_plan(batch.doc_lengths, batch.turn_lengths, batch.turn_is_context,
                              batch.num_ranks, batch.tokens_per_rank, c.tolerance,
                              c.min_shard_tokens, shape, device,
                              num_servers=batch.num_ranks + num_dedicated_servers(cfg),
                              buffer_budget_mb=c.buffer_budget_mb)


def staggered_pingpong(cfg: DistcaConfig, group_size: int) -> bool:
    """Whether ping-pong runs over whole layers with token nano-batches (the exchange of one
    overlaps the other's linear layers, :mod:`distca.model.staggered`).

    Otherwise ping-pong splits each layer's attention tasks in two (the exchange of one
    overlaps the other's attention only): FocuSFT's bilevel step is built on that split, and
    with one rank in the exchange there is no communication to hide, so its layout is kept
    there (it is what FocuSFT's SFT-equivalence is measured against).
    """
    c = cfg.cad
    return c.enabled and c.ping_pong and group_size > 1 and not cfg.focusft.enabled


def exchange_layout(cfg: DistcaConfig, plan: StepPlan, batch: PackedBatch, rank: int,
                    group_size: int, device: torch.device
                    ) -> DispatchLayout | tuple[DispatchLayout, DispatchLayout] | NanoBatches:
    """Group rank ``rank``'s exchange of ``batch``: one layout (blocking), two task nano-batch
    layouts, or token nano-batches (see :func:`staggered_pingpong`)."""
    c = cfg.cad
    if staggered_pingpong(cfg, group_size):
        cuts = document_cuts(batch.doc_lengths, batch.turn_lengths, batch.turn_is_context,
                             batch.num_ranks, batch.tokens_per_rank)
        return nano_batches(plan.servers, cuts, rank, batch.num_ranks, batch.tokens_per_rank,
                            group_size, device)
    return plan.layouts(rank, batch.num_ranks, batch.tokens_per_rank, group_size,
                        c.enabled and c.ping_pong, device)


class AttentionServer:
    """One dedicated server rank; the step API mirrors :class:`distca.engine.Engine`.

    ``Engine(cfg)`` returns one of these on server ranks, so launchers need not know roles.
    Stats carry the plan figures and timing only: the loss lives on the workers.
    """

    def __init__(self, cfg: DistcaConfig) -> None:
        self.cfg = cfg
        self.device, self.dp_group, self.exchange_group = join_runtime(cfg)
        self.rank = dist.get_rank()
        self.runtime = AttentionRuntime(cfg.model.rope_theta, cfg.attention.backend.value,
                                        group=self.exchange_group)
        m = cfg.model
        self.shape = ModelShape(h_q=m.num_attention_heads, h_kv=m.num_kv_heads,
                                head_dim=m.hidden_size // m.num_attention_heads,
                                bytes_per_elem=2 if cfg.trainer.precision.value == "bf16" else 4)
        self.dtype = torch.bfloat16 if cfg.trainer.precision.value == "bf16" else torch.float32
        # FocuSFT: attention layers of the inner loop (the adapted layers above the first one,
        # whose attention runs once, with the layers below it)
        f = cfg.focusft
        self.inner_layers = top_layer_count(m.num_layers, f.layer_fraction) - 1 if f.enabled else 0
        self.step = 0

    def _load(self, batch: PackedBatch, plan: StepPlan) -> None:
        """Point the runtime at this server's exchanges of ``batch``."""
        layout = exchange_layout(self.cfg, plan, batch, self.rank,
                                 dist.get_world_size(self.exchange_group), self.device)
        if isinstance(layout, NanoBatches):
            # the workers' staggered layers issue the exchanges of ping-pong attention
            layout = layout.layouts
        self.runtime.set_batch(torch.zeros(0, dtype=torch.int64, device=self.device), layout)

    def _serve(self, batch: PackedBatch, plan: StepPlan, grad: bool) -> torch.Tensor:
        """Serve every layer's exchange of one micro-batch; a scalar whose backward serves the
        backward exchanges (in reverse layer order, as on the workers)."""
        self._load(batch, plan)
        if self.inner_layers and grad:
            return self._serve_focusft()
        return self._attend_layers(self.cfg.model.num_layers, grad)

    def _serve_focusft(self) -> torch.Tensor:
        """The FocuSFT step's exchanges (see the module docstring); returns the outer scalar."""
        total = self._attend_layers(self.cfg.model.num_layers - self.inner_layers, True)
        for _ in range(self.cfg.focusft.inner_steps):
            self._attend_layers(self.inner_layers, True).backward()
        return self._attend_layers(self.inner_layers, True, total)

    def _attend_layers(self, layers: int, grad: bool, total: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """Join ``layers`` layers' forward exchanges; fp32 scalar (``total`` plus their
        outputs) whose backward joins their backward exchanges, last layer first."""
        s = self.shape
        if total is None:
            total = torch.zeros((), device=self.device)
        for _ in range(layers):
            q, k, v = (torch.zeros(0, h, s.head_dim, dtype=self.dtype, device=self.device,
                                   requires_grad=grad) for h in (s.h_q, s.h_kv, s.h_kv))
            out, lse = self.runtime.attend(q, k, v, s.head_dim ** -0.5)
            total = total + out.float().sum() + lse.sum()
        return total

    def forward_backward(self, micro_batches: list[PackedBatch]) -> dict[str, float]:
        plans = [plan_micro_batch(self.cfg, b, self.shape, self.device) for b in micro_batches]
        for batch, plan in zip(micro_batches, plans):
            self._serve(batch, plan, grad=True).backward()
        return {"imbalance_before": float(np.mean([p.imbalance_before for p in plans])),
                "imbalance": float(np.mean([p.imbalance for p in plans]))}

    def train_step(self, micro_batches: list[PackedBatch]) -> dict[str, float]:
        start = time.perf_counter()
        stats = self.forward_backward(micro_batches)
        n = self.cfg.attention.telemetry_interval
        if n > 0 and self.cfg.model.learnable_sinks and self.step % n == 0:
            # the workers' telemetry reduction is over every rank; servers add nothing
            dist.all_reduce(torch.zeros(self.cfg.model.num_layers, 2, dtype=torch.float64))
        self.step += 1
        stats.update(tokens=float(sum(b.doc_lengths.sum() for b in micro_batches)),
                     step_time_s=time.perf_counter() - start)
        return stats

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[PackedBatch]) -> float:
        """Serves the workers' evaluation forward; the loss is theirs (NaN here)."""
        plans = [plan_micro_batch(self.cfg, b, self.shape, self.device) for b in micro_batches]
        for batch, plan in zip(micro_batches, plans):
            self._serve(batch, plan, grad=False)
        return float("nan")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"step": torch.tensor(self.step, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.step = int(state["step"])
