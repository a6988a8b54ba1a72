"""The full (TP=1, PP=1) model state and this rank's tensor/pipeline shard of it.

Layout of a Llama-family GPTModel over ``tp`` tensor-parallel and ``pp`` pipeline ranks
(megatron-core's own split; distca only names it):

* pipeline stage ``s`` holds decoder layers ``[s*L/pp, (s+1)*L/pp)`` under local names
  ``decoder.layers.0..`` (global name = local index + stage offset); the embedding lives on the
  first stage, ``final_layernorm`` and ``output_layer`` on the last.
* tensor-parallel rank ``t`` holds query groups ``[t*G/tp, (t+1)*G/tp)`` and their heads:
  the rows of ``linear_qkv`` (megatron packs q, [gate,] k, v per group, so a group's rows are
  contiguous), the same heads' columns of ``linear_proj`` and their sink logits; a ``1/tp`` slice
  of the FFN (rows of ``linear_fc1``, columns of ``linear_fc2``) and of the vocabulary (rows of
  the embedding and the output layer). Norm weights are replicated.
* ``linear_fc1`` of a gated (SwiGLU) MLP stacks ``[gate; up]``; each rank holds
  ``[gate_t; up_t]``, so the full weight is not a plain concatenation of the shards.

Every rank holds all of its stage's tokens (the data-parallel slice): attention of rank ``t``
covers only its own heads, so CA-tasks are dispatched within the data-parallel group of each
(tensor rank, stage), all with the same plan.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def global_name(name: str, layer_offset: int) -> str:
    """The full-model name of a local parameter name (decoder layers renumbered)."""
    return _LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + layer_offset}.", name)


def _is_glu_fc1(name: str, glu: bool) -> bool:
    return glu and ".mlp.linear_fc1." in name


def shard_tensor(name: str, full: torch.Tensor, param: torch.nn.Parameter, tp_rank: int, tp: int,
                 glu: bool) -> torch.Tensor:
    """This tensor-parallel rank's slice of the full tensor of ``param``."""
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if _is_glu_fc1(name, glu):
        return torch.cat([half.chunk(tp, dim)[tp_rank] for half in full.chunk(2, dim)], dim)
    return full.chunk(tp, dim)[tp_rank]


def join_shards(name: str, shards: list[torch.Tensor], dim: int, glu: bool) -> torch.Tensor:
    """The full tensor from its ``tp`` tensor-parallel slices (in tensor-rank order) split on
    ``dim``; a gated ``linear_fc1`` joins its gate halves, then its up halves."""
    if _is_glu_fc1(name, glu):
        halves = [s.chunk(2, dim) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim)
    return torch.cat(shards, dim)


def gather_tensor(name: str, local: torch.Tensor, param: torch.nn.Parameter, tp: int,
                  tp_group: dist.ProcessGroup | None, glu: bool) -> torch.Tensor:
    """The full tensor from every tensor-parallel rank's ``local`` slice (collective over TP)."""
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return local
    shards = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(shards, local.contiguous(), group=tp_group)
    return join_shards(name, shards, param.partition_dim, glu)


def gather_full(model: torch.nn.Module, tensors: dict[str, torch.Tensor], layer_offset: int,
                tp: int, tp_group, pp: int, pp_group, glu: bool) -> dict[str, torch.Tensor]:
    """Full-model tensors (every rank gets all of them) from this rank's per-parameter
    ``tensors`` (local names, e.g. weights or gradients). Collective over the TP and PP groups."""
    params = dict(model.named_parameters())
    full = {global_name(n, layer_offset): gather_tensor(n, t.detach().cpu(), params[n], tp,
                                                        tp_group, glu)
            for n, t in tensors.items()}
    if pp == 1:
        return full
    stages: list = [None] * pp
    dist.all_gather_object(stages, full, group=pp_group)
    return {k: v for stage in stages for k, v in stage.items()}


def load_full(model: torch.nn.Module, full: dict[str, torch.Tensor], layer_offset: int,
              tp_rank: int, tp: int, glu: bool, tied: bool = False) -> dict[str, torch.Tensor]:
    """Copy this rank's shard of the full-model ``full`` weights into ``model``'s parameters
    (cast to their dtype); returns the shards as given (say fp32), by local name. ``tied``:
    a last pipeline stage's ``output_layer`` is a copy of the embedding."""
    shards = {}
    for name, param in model.named_parameters():
        key = global_name(name, layer_offset)
        if tied and key == "output_layer.weight":
            key = "embedding.word_embeddings.weight"
        if key not in full:
            raise KeyError(f"full model state has no {key!r} (this rank's {name!r})")
        shard = shard_tensor(name, full[key], param, tp_rank, tp, glu)
        if shard.shape != param.shape:
            raise ValueError(f"{key}: shard of shape {tuple(shard.shape)} for a parameter of "
                             f"shape {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(shard)
        shards[name] = shard
    return shards
