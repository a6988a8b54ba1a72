"""The process mesh: every rank's place and every process group the runtime uses (design §5).

The world is ``dp × tp × pp`` worker ranks (megatron's ``tp-cp-ep-dp-pp`` order: tensor rank
fastest, then data-parallel rank, then pipeline stage) followed by ``servers`` dedicated
attention-server ranks (``cad.server_mode=dedicated``; only with ``tp = pp = 1``), which hold
no tokens and no weights.

Groups, each created once here, collectively, in the same order on every rank:

* ``grads``: the data-parallel workers of this rank's (tensor rank, stage): gradients, losses
  and FocuSFT's fast-weight gradients are summed over it. ``None`` on a dedicated server,
  which takes part in no such reduction (:meth:`ProcessMesh.all_reduce_grads` is then a no-op);
* ``exchange``: the ranks that exchange CA-tasks of one micro-batch: the ``grads`` workers plus
  every dedicated server (megatron's data-parallel group, where the servers count as
  data-parallel ranks);
* ``tp`` / ``pp``: megatron's tensor- and pipeline-parallel groups;
* ``lockstep``: with ``pp > 1`` and disaggregated attention (not FocuSFT:
  :func:`lockstep_pipeline`), all ``dp × pp`` ranks of this rank's tensor rank, ordered
  (stage, data-parallel rank): the lock-step pipeline's rounds.

megatron's ``parallel_state`` is initialised here (its model reads it); the CPU shims it needs
are applied first (:mod:`distca.model.megatron_adapter`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from distca.config import DistcaConfig, ServerMode
from distca.model.megatron_adapter import apply_cpu_shims


def lockstep_pipeline(cfg: DistcaConfig) -> bool:
    """Whether steps run the lock-step pipeline, whose every tick joins all stages'
    attention: ``pp > 1`` with disaggregated attention, except FocuSFT, whose inner loop runs
    the adapted stages only (their attention then stays in each stage's data-parallel group)."""
    return cfg.parallel.pp > 1 and cfg.cad.enabled and not cfg.focusft.enabled


def dedicated_server_count(cfg: DistcaConfig) -> int:
    """Server-only ranks after the workers (0 with in-place serving)."""
    c = cfg.cad
    return c.num_dedicated_servers if c.server_mode is ServerMode.dedicated else 0


def world_size(cfg: DistcaConfig) -> int:
    """Ranks of a run: the workers, then the dedicated servers."""
    p = cfg.parallel
    return p.dp * p.tp * p.pp + dedicated_server_count(cfg)


@dataclass
class ProcessMesh:
    """This rank's coordinates and groups (module docstring). Build with :meth:`build`."""

    dp: int
    tp: int
    pp: int
    servers: int
    rank: int
    device: torch.device
    dp_rank: int  # this worker's data-parallel rank; on a dedicated server its exchange rank
    tp_rank: int
    pp_rank: int
    grads: dist.ProcessGroup | None
    exchange: dist.ProcessGroup
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    lockstep: dist.ProcessGroup | None

    @property
    def is_server(self) -> bool:
        return self.rank >= self.dp * self.tp * self.pp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def exchange_size(self) -> int:
        return dist.get_world_size(self.exchange)

    def neighbours(self) -> tuple[int | None, int | None]:
        """Global ranks of the previous and next pipeline stage (None at the ends)."""
        prev = None if self.is_first_stage else parallel_state.get_pipeline_model_parallel_prev_rank()
        after = None if self.is_last_stage else parallel_state.get_pipeline_model_parallel_next_rank()
        return prev, after

    def all_reduce_grads(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over the data-parallel workers, in place; a no-op with one worker
        and on dedicated servers (they hold no gradients and no losses)."""
        if self.grads is not None and self.dp > 1:
            dist.all_reduce(tensor, group=self.grads)

    @classmethod
    def build(cls, cfg: DistcaConfig) -> ProcessMesh:
        """Collective on every rank, after torch.distributed is started."""
        p, servers = cfg.parallel, dedicated_server_count(cfg)
        if not dist.is_initialized():
            raise RuntimeError("the process mesh needs torch.distributed started first "
                               "(distca.bootstrap.start_process_group)")
        world = dist.get_world_size()
        if world != world_size(cfg):
            raise ValueError(f"world size {world} != parallel.dp*tp*pp + dedicated servers = "
                             f"{p.dp * p.tp * p.pp} + {servers}")
        device = torch.device("cuda", torch.cuda.current_device()) \
            if torch.cuda.is_available() else torch.device("cpu")
        apply_cpu_shims()
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(p.tp, p.pp)
        exchange = parallel_state.get_data_parallel_group()
        rank = dist.get_rank()
        grads = exchange
        if servers:  # megatron counts the servers as data-parallel ranks: leave them out
            workers = dist.new_group(list(range(p.dp)))
            grads = workers if rank < p.dp else None
        coords = (parallel_state.get_tensor_model_parallel_rank(),
                  parallel_state.get_pipeline_model_parallel_rank(),
                  parallel_state.get_data_parallel_rank())
        lockstep = _lockstep_groups(p.tp, coords) if lockstep_pipeline(cfg) else None
        return cls(p.dp, p.tp, p.pp, servers, rank, device, coords[2], coords[0], coords[1],
                   grads, exchange, parallel_state.get_tensor_model_parallel_group(),
                   parallel_state.get_pipeline_model_parallel_group(), lockstep)


def _lockstep_groups(tp: int, coords: tuple[int, int, int]) -> dist.ProcessGroup:
    """This rank's lock-step group: every rank of its tensor rank (collective on every rank;
    ``coords`` = (tensor, pipeline, data-parallel) rank)."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, coords)
    groups = {}
    for t in range(tp):  # every rank creates every group, in the same order
        ranks = sorted(r for r, c in enumerate(everyone) if c[0] == t)
        if [everyone[r][1:] for r in ranks] != sorted(everyone[r][1:] for r in ranks):
            raise NotImplementedError("lock-step pipeline needs global ranks ordered by "
                                      "(stage, data-parallel rank) within a tensor rank")
        groups[t] = dist.new_group(ranks)
    return groups[coords[0]]
