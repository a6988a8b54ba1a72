"""What a rank holds: a worker's model shard and optimizer, or a dedicated server's nothing.

The step (:mod:`distca.step`) is written once; the role gives it the stage model it runs
(:mod:`distca.model.stage`), which of a micro-batch's tokens are this rank's, the trainable
tensors and their optimizer, FocuSFT's fast weights (a checkpoint keeps the model and the
optimizer: :mod:`distca.train.sharded_state`). Chosen by
:func:`make_role` from the rank's place in the mesh.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from distca.config import DistcaConfig, FocusftConfig, Recompute
from distca.focusft.fast_weights import FastLoRA
from distca.mesh import ProcessMesh
from distca.model.attention_only import AttentionOnlyStage
from distca.model.llama import build_model
from distca.model.megatron_adapter import MegatronStage, seed_model_parallel
from distca.model.recompute import RecomputedStage
from distca.model.runtime import AttentionRuntime
from distca.model.sharding import gather_full, load_full
from distca.optimizer import Optimizer


def compute_dtype(cfg: DistcaConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.trainer.precision.value == "bf16" else torch.float32


class WorkerRole:
    """A worker: this (tensor rank, stage)'s megatron model, its optimizer slice, its tokens."""

    holds_weights = True

    def __init__(self, cfg: DistcaConfig, mesh: ProcessMesh, runtime: AttentionRuntime) -> None:
        self.cfg, self.mesh = cfg, mesh
        self.layer_offset = mesh.pp_rank * (cfg.model.num_layers // mesh.pp)
        seed_model_parallel(cfg.trainer.seed, mesh.tp_rank)
        sp = cfg.parallel.sequence_parallel
        self.model = build_model(cfg.model, runtime, cfg.trainer.precision, sp)
        self.stage = MegatronStage(self.model, mesh.tp_group if sp else None)
        if cfg.model.recompute is not Recompute.none:  # distca.model.recompute says why
            # with sequence parallelism the layer input is sharded over TP already
            self.stage = RecomputedStage(self.stage, runtime, cfg.model.recompute,
                                         None if sp else mesh.tp_group)
        self.params = [q for q in self.model.parameters() if q.requires_grad]
        self.optimizer = Optimizer(self.params, cfg.optim, mesh.grads)
        # tied embeddings over pipeline stages: the first stage's embedding and the last
        # stage's output layer are two copies of one weight; their gradients are summed over
        # megatron's embedding group (first and last stage of this tensor rank)
        self.tied = None
        if cfg.model.tie_embeddings and mesh.pp > 1 and (mesh.is_first_stage
                                                         or mesh.is_last_stage):
            self.tied = self.model.shared_embedding_or_output_weight()
            self.tied_group = self.model.embd_group

    def rows(self, batch) -> slice:
        """This rank's tokens of a micro-batch (a :class:`distca.batch.PackedBatch`)."""
        return batch.rank_slice(self.mesh.dp_rank)

    def fast_weights(self, f: FocusftConfig, num_top: int) -> FastLoRA:
        """FocuSFT's fast adapters on this stage's share of the model's top ``num_top``
        layers (none on a pipeline stage below them), sharded over TP like the MLP."""
        first = self.cfg.model.num_layers - num_top  # the first adapted layer, global index
        layers = list(self.model.decoder.layers)[max(first - self.layer_offset, 0):]
        m = self.mesh
        return FastLoRA(layers, list(f.targets), f.rank, f.alpha, m.tp_rank, m.tp, m.tp_group,
                        layers_below=max(self.layer_offset - first, 0))

    # ---- the whole-model view --------------------------------------------------------------
    def gather(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole-model tensors under TP=1/PP=1 names from every rank's shard (collective)."""
        m = self.mesh
        full = gather_full(self.model, tensors, self.layer_offset, m.tp, m.tp_group, m.pp,
                           m.pp_group, self.model.config.gated_linear_unit)
        if self.cfg.model.tie_embeddings:  # the last stage's copy of the embedding
            full.pop("output_layer.weight", None)
        return full

    def load_full(self, full: dict[str, torch.Tensor]) -> None:
        """This rank's shard of whole-model weights (TP=1/PP=1 names, any float dtype); the
        fp32 master weights take the given values, not the model's bf16 rounding."""
        shards = load_full(self.model, full, self.layer_offset, self.mesh.tp_rank, self.mesh.tp,
                           self.model.config.gated_linear_unit, self.cfg.model.tie_embeddings)
        named = [n for n, q in self.model.named_parameters() if q.requires_grad]
        self.optimizer.master_from_model([shards[n].float() for n in named])

    def init_from(self, path: str) -> None:
        """Load this rank's shard of the pretrained ``model.init_from`` source (each worker
        reads the whole model, :func:`distca.hf.io.read_model_weights`, and keeps its slice)."""
        from distca.hf.io import read_model_weights

        self.load_full(read_model_weights(path))


class AnchorFastWeights:
    """A dedicated server's stand-in for :class:`FastLoRA`: the attention-only stage's anchor
    (:mod:`distca.model.attention_only`), so the inner loop's autograd reaches the same
    exchanges as on the workers. Its gradient is never used."""

    def __init__(self, anchor: torch.Tensor) -> None:
        self.tensors = [anchor]
        self.active = False

    def reset(self, generator: torch.Generator) -> None:
        self.tensors[0].requires_grad_(True)

    def freeze(self) -> None:
        self.tensors[0].requires_grad_(False)

    def sgd_step(self, grads, lr: float, clip: float) -> None:
        pass


class ServerRole:
    """A dedicated attention server: no tokens, no weights; attention-only layers."""

    holds_weights = False

    def __init__(self, cfg: DistcaConfig, mesh: ProcessMesh, runtime: AttentionRuntime,
                 fast_layers: int) -> None:
        m = cfg.model
        self.stage = AttentionOnlyStage(runtime, m.num_layers, m.num_attention_heads,
                                        m.num_kv_heads, m.hidden_size // m.num_attention_heads,
                                        compute_dtype(cfg), fast_layers)
        self.params: list[torch.Tensor] = []
        self.optimizer = None
        self.tied = None

    def rows(self, batch) -> slice:
        return slice(0, 0)

    def fast_weights(self, f: FocusftConfig, num_top: int) -> AnchorFastWeights:
        return AnchorFastWeights(self.stage.anchor)

    def init_from(self, path: str) -> None:
        pass  # no weights


def init_from_source(role: WorkerRole | ServerRole, path: str, at_once: int = 4) -> None:
    """Every rank (collective): the workers load their shards of the pretrained ``path``,
    at most ``at_once`` ranks reading the whole model at a time, so that a node's host memory
    holds ``at_once`` copies of it rather than one per rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    for turn in range(0, world, at_once):
        if turn <= rank < turn + at_once:
            role.init_from(path)
        dist.barrier()


def make_role(cfg: DistcaConfig, mesh: ProcessMesh, runtime: AttentionRuntime,
              fast_layers: int) -> WorkerRole | ServerRole:
    """The role of this rank: a dedicated server after the workers, else a worker.
    ``fast_layers``: top layers with FocuSFT fast weights (0 without FocuSFT)."""
    if mesh.is_server:
        return ServerRole(cfg, mesh, runtime, fast_layers)
    return WorkerRole(cfg, mesh, runtime)
