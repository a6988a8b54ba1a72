"""Activation recomputation (``model.recompute``), written once over the layer halves.

A layer is ``before_attention`` (input norm, QKV (+gate) projection, RoPE) → core attention
through the step's exchange → ``after_attention`` (sink, gate, o_proj, residual, MLP block).
The linear halves are checkpointed with ``torch.utils.checkpoint`` (non-reentrant: it keeps the
autograd graph whole, so FocuSFT's inner ``torch.autograd.grad`` into the fast weights works
through it, and the exchanges between the halves stay ordinary graph nodes):

* ``none``: nothing recomputed; the stage runs megatron's own forward.
* ``selective``: the after-attention half (o_proj, residual, second norm, MLP) is recomputed
  in backward from the attention output, lse, gate and layer input, which it keeps; the
  before-attention half keeps its activations (layer input and first norm output). The MLP
  holds most of a layer's activations (its ``5f`` of ``12h + 5f`` per token) at the cost of
  re-running about two thirds of the layer's linear FLOPs.
* ``full``: both halves are recomputed; a layer keeps only its input, sharded over the
  tensor-parallel group (megatron's ``distribute_saved_activations``: each TP rank keeps
  ``ceil(T/tp)`` rows and the recompute all-gathers them), plus what core attention keeps.

**Core attention is never recomputed.** Under CAD its saved q/k/v, out and lse live on the
server that ran each task, and re-running it would re-plan nothing but re-send q/k/v and re-run
the kernel; the backward exchange needs exactly what it already has: the worker's merged out
and lse (inputs of the after half, kept) and the server's buffers, so backward sends dO and
gets dq/dk/dv as without recompute, and recomputation never touches the exchanges. megatron's
own ``recompute_granularity="full"`` would recompute core attention inside the layer (a second
dispatch) and its checkpoint is reentrant (no ``torch.autograd.grad`` into FocuSFT's fast
weights), which is why distca runs its halves itself when recompute is on, in the plain and
the staggered (ping-pong) paths alike; a dedicated server's attention-only layers have nothing
to recompute and run unchanged, so their exchanges line up with the workers'.

**FocuSFT**: the inner loop's forwards of the adapted layers go through the same checkpoints
(the reference checkpoints the adapted layers): each inner ``autograd.grad`` recomputes the
layers it differentiates, with the fast weights of that inner step.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from distca.config import Recompute
from distca.model.rows import gather_rows, shard_rows
from distca.model.runtime import AttentionRuntime
from distca.model.stage import StageLayer, StageModel


def _ckpt(fn, *args):
    return checkpoint(fn, *args, use_reentrant=False)


class RecomputedLayer:
    """:class:`~distca.model.stage.StageLayer` running ``layer``'s halves under checkpoints
    (module docstring). ``tp_group``: where ``full`` shards the kept layer input (None: whole)."""

    def __init__(self, layer: StageLayer, runtime: AttentionRuntime, mode: Recompute,
                 tp_group=None) -> None:
        self.layer, self.runtime, self.mode = layer, runtime, mode
        self.heads, self.head_dim, self.softmax_scale = (layer.heads, layer.head_dim,
                                                         layer.softmax_scale)
        self.group = tp_group if tp_group is not None and dist.get_world_size(tp_group) > 1 \
            else None
        self._kept: dict[int, torch.Tensor] = {}  # id(layer input) -> its shard, before → after

    def _keep(self, hidden: torch.Tensor):
        """What the checkpoints keep of the layer input, and how they get it back."""
        if self.group is None or self.mode is not Recompute.full:
            return hidden, lambda x: x
        shard = self._kept.pop(id(hidden), None)
        if shard is None:
            shard = shard_rows(hidden, self.group)
        return shard, functools.partial(gather_rows, group=self.group,
                                        rows=hidden.shape[0])

    def before_attention(self, hidden, cos, sin):
        if self.mode is not Recompute.full:
            return self.layer.before_attention(hidden, cos, sin)
        kept, restore = self._keep(hidden)
        if self.group is not None:
            self._kept[id(hidden)] = kept  # the after half keeps the same shard
        return _ckpt(lambda x: self.layer.before_attention(restore(x), cos, sin), kept)

    def _after(self, fn, out, lse, gate, residual):
        kept, restore = self._keep(residual)
        return _ckpt(lambda o, s, g, x: fn(o, s, g, restore(x)), out, lse, gate, kept)

    def after_attention(self, out, lse, gate, residual):
        return self._after(self.layer.after_attention, out, lse, gate, residual)

    def attention_out(self, out, lse, gate, residual):
        return self._after(self.layer.attention_out, out, lse, gate, residual)

    def _attend(self, hidden):
        q, k, v, gate = self.before_attention(hidden, *self.runtime.rope(self.head_dim))
        return (*self.runtime.attend(q, k, v, self.softmax_scale), gate)

    def __call__(self, hidden):
        return self.after_attention(*self._attend(hidden), hidden)

    def attention_block(self, hidden):
        return self.attention_out(*self._attend(hidden), hidden)

    def mlp_block(self, hidden):
        return _ckpt(self.layer.mlp_block, hidden)


class RecomputedStage:
    """:class:`~distca.model.stage.StageModel` whose forward runs ``stage``'s layers one by one
    as :class:`RecomputedLayer` (``stage``'s own forward is megatron's, which would not)."""

    def __init__(self, stage: StageModel, runtime: AttentionRuntime, mode: Recompute,
                 tp_group=None) -> None:
        self.stage = stage
        self.layers = [RecomputedLayer(layer, runtime, mode, tp_group) for layer in stage.layers]
        self.pre_process, self.post_process = stage.pre_process, stage.post_process
        self.row_group = stage.row_group

    def forward(self, tokens, hidden_in, labels):
        hidden = self.embed(tokens, hidden_in)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.losses(hidden, labels) if self.post_process else hidden

    def embed(self, tokens, hidden_in):
        return self.stage.embed(tokens, hidden_in)

    def losses(self, hidden, labels):
        return self.stage.losses(hidden, labels)
