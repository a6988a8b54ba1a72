"""Ping-pong over the linear layers: one pipeline stage's forward as two staggered nano-batches.

The rank's tokens are split into two causally closed nano-batches
(:mod:`distca.parallel.nanobatch`). Every layer is run in two halves per nano-batch: *before*
attention (input norm, QKV (+gate) projection, RoPE) and *after* it (sink, output gate,
o_proj, residual, MLP block). With ``a``/``b`` the nano-batches, one layer is::

    after(a, l-1), before(a, l), send a  | after(b, l-1), before(b, l), send b  [a's q/k/v fly]
    | serve a, return a                                                          [b's q/k/v fly]
    | serve b, return b                                                          [a's out flies]
    | (next layer) after(a, l), before(a, l+1), send a                           [b's out flies]

so each nano-batch's exchanges overlap the other's linear layers or attention. Autograd replays
the nodes in reverse creation order, which mirrors the overlap in the backward (the dO of one
nano-batch travels during the other's MLP/o_proj backward, its dq/dk/dv during the other's
QKV backward). The phases come from the step's exchange (:meth:`AttentionRuntime.phases`): the
per-stage token ping-pong, or the lock-step pipeline's sub-rounds. A dedicated attention server
runs this same driver over its attention-only layers with no tokens of its own.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from distca.model.rows import gather_rows, pad_rows, shard_rows
from distca.model.runtime import AttentionRuntime
from distca.model.stage import StageLayer, StageModel


def staggered_layers(layers: list[StageLayer], hidden: torch.Tensor, runtime: AttentionRuntime,
                     row_group=None) -> torch.Tensor:
    """Run ``layers`` on hidden (T, 1, H) with the runtime's staggered exchange; same shape out.

    With sequence parallelism (``row_group``: the TP group) ``hidden`` is this rank's
    ``T/tp`` rows: the nano-batches are cut from the gathered rows and each is sharded over the
    group on its own (zero-padded to equal shards; the layers' linears gather and
    reduce-scatter them, and the pads never reach the exchange), then gathered back at the end.
    """
    hq, d = layers[0].heads, layers[0].head_dim
    phases = runtime.phases(layers[0].softmax_scale)
    cos, sin = runtime.rope(d)
    tables = [(cos.index_select(0, r), sin.index_select(0, r)) for r in phases.rows]
    counts = [r.numel() for r in phases.rows]
    if row_group is not None:
        world = dist.get_world_size(row_group)
        hidden = gather_rows(hidden, row_group, hidden.shape[0] * world)
    hidden_of = [hidden.index_select(0, r) for r in phases.rows]
    if row_group is not None:
        hidden_of = [shard_rows(h, row_group) for h in hidden_of]
    pending = [None, None]  # per nano-batch: (layer, gate, residual) awaiting its results

    def land(i: int) -> torch.Tensor:
        layer, gate, residual = pending[i]
        out, lse = phases.land(i, counts[i], hq, d)
        if row_group is not None:  # the padded rows of the nano-batch's shards
            rows = residual.shape[0] * world
            out, lse = pad_rows(out, rows), pad_rows(lse, rows, float("-inf"))
            gate = None if gate is None else pad_rows(gate, rows)
        return layer.after_attention(out.to(residual.dtype), lse, gate, residual)

    for layer in layers:
        gates, first_kv = [], None
        for i in (0, 1):
            if pending[i] is not None:
                hidden_of[i] = land(i)
            q, k, v, gate = layer.before_attention(hidden_of[i], *tables[i])
            if i == 0:
                first_kv = (k, v)
            else:  # the second nano-batch's tasks also read the first one's kv
                k, v = torch.cat([first_kv[0], k]), torch.cat([first_kv[1], v])
            phases.send(i, q, k, v)
            gates.append(gate)
        phases.serve()
        pending = [(layer, gates[i], hidden_of[i]) for i in (0, 1)]
    hidden_of = [land(i) for i in (0, 1)]
    if row_group is not None:
        hidden_of = [gather_rows(h, row_group, n) for h, n in zip(hidden_of, counts)]
    out = torch.cat(hidden_of).index_select(0, phases.order)
    return out if row_group is None else shard_rows(out, row_group)


def stage_forward(stage: StageModel, runtime: AttentionRuntime, tokens: torch.Tensor,
                  hidden_in: torch.Tensor | None, labels: torch.Tensor | None) -> torch.Tensor:
    """One pipeline stage's forward through the runtime's exchange: megatron's own forward with
    per-layer exchanges, or the layers staggered. Shapes as :meth:`StageModel.forward`."""
    if not runtime.staggered:
        return stage.forward(tokens, hidden_in, labels)
    hidden = stage.embed(tokens, hidden_in)
    if stage.layers:
        hidden = staggered_layers(stage.layers, hidden, runtime, stage.row_group)
    return stage.losses(hidden, labels) if stage.post_process else hidden
