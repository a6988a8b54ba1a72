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
QKV backward). The collectives are issued in the same order as
:func:`distca.parallel.pingpong.pingpong_attention` (send a, send b, return a, return b per
layer), so dedicated attention servers serve these layers with that function.

The same driver runs a stage's forward in the lock-step pipeline with ping-pong: the exchange
is then :class:`distca.parallel.lockstep_worker.LockstepNanoExchange`, whose sends and returns
are the sub-rounds of the tick's rounds, which every stage and bubble rank joins.

The halves call megatron-core 0.16's own submodules of ``TransformerLayer`` and
``SelfAttention`` in the order of their ``forward`` methods (no recompute, offload or
inference paths, which distca does not use).
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel

from distca.model.rope import apply_rope
from distca.model.runtime import AttentionRuntime
from distca.parallel.dispatch import merge_partials
from distca.parallel.lockstep_worker import LockstepNanoExchange
from distca.parallel.nanobatch import NanoBatches
from distca.parallel.pingpong import receive_results, send_qkv, serve_and_return


def _before_attention(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(q (n, hq, d), k, v (n, hkv, d), gate or None) of hidden (n, 1, H), RoPE applied."""
    attn = layer.self_attention
    n = hidden.shape[0]
    if n == 0:
        # A worker inside one long document can have an empty nano-batch; it still joins the
        # exchanges. megatron's reshape cannot infer the heads of zero rows: run one zero row
        # and keep none of it.
        hidden = hidden.new_zeros(1, *hidden.shape[1:])
    parts = attn.get_query_key_value_tensors(layer.input_layernorm(hidden), None,
                                             output_gate=attn.config.attention_output_gate,
                                             split_qkv=True)
    q, k, v = (x[:n, 0] for x in parts[:3])
    gate = parts[3][:n] if len(parts) == 4 else None
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v.contiguous(), gate


def _after_attention(layer, out: torch.Tensor, lse: torch.Tensor, gate, residual: torch.Tensor
                     ) -> torch.Tensor:
    """The layer's output hidden (n, 1, H) from merged attention (out (n, hq, d), lse (n, hq))."""
    attn = layer.self_attention
    context = attn.core_attention.finish(out, lse)
    if gate is not None:
        context = attn._apply_output_gate(context, gate)
    with layer.bias_dropout_add_exec_handler():
        hidden = layer.self_attn_bda(layer.training, layer.config.bias_dropout_fusion)(
            attn.linear_proj(context), residual, layer.hidden_dropout)
    return layer._forward_mlp(hidden)


class _TokenNanoExchange:
    """The per-stage exchange of token nano-batches (:class:`NanoBatches`) in the phases of
    :func:`staggered_layers`: send each nano-batch, serve both, land each."""

    def __init__(self, nano: NanoBatches, runtime: AttentionRuntime, softmax_scale: float) -> None:
        self.nano, self.rows, self.order = nano, nano.rows, nano.order
        self.attend = runtime.kernel(softmax_scale)
        self.group, self.timings = runtime.group, runtime.timings
        self.sent: list = [None, None]
        self.returned: list = [None, None]

    def send(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.sent[i] = (send_qkv(q, k, v, self.nano.layouts[i], self.group, self.timings),
                        (q.shape[1], k.shape[1], q.shape[2]))

    def serve(self) -> None:
        for i, (exchange, shape) in enumerate(self.sent):
            self.returned[i] = serve_and_return(exchange, self.nano.layouts[i], self.attend, shape,
                                                self.group, self.timings)

    def land(self, i: int, num_rows: int, hq: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        layout = self.nano.layouts[i]
        out_r, lse_r = receive_results(self.returned[i], layout, hq, d)
        return merge_partials(out_r, lse_r, layout.merge_index, num_rows)


def staggered_layers(layers, hidden: torch.Tensor, runtime: AttentionRuntime) -> torch.Tensor:
    """Run ``layers`` on hidden (T, 1, H) with the runtime's token nano-batches (per-stage
    exchange, or the lock-step pipeline's when its layout is a ping-pong
    :class:`~distca.parallel.lockstep.LockstepExchange`); same shape out."""
    core = layers[0].self_attention.core_attention
    hq, d = core.heads, core.head_dim
    if isinstance(runtime.layout, NanoBatches):
        exchange = _TokenNanoExchange(runtime.layout, runtime, core.softmax_scale)
    else:
        exchange = LockstepNanoExchange(runtime.layout, core.softmax_scale)
    cos, sin = runtime.rope(d)
    tables = [(cos.index_select(0, r), sin.index_select(0, r)) for r in exchange.rows]
    hidden_of = [hidden.index_select(0, r) for r in exchange.rows]
    pending = [None, None]  # per nano-batch: (layer, gate, residual) awaiting its results

    def land(i: int) -> torch.Tensor:
        layer, gate, residual = pending[i]
        out, lse = exchange.land(i, residual.shape[0], hq, d)
        return _after_attention(layer, out.to(residual.dtype), lse, gate, residual)

    for layer in layers:
        gates, first_kv = [], None
        for i in (0, 1):
            if pending[i] is not None:
                hidden_of[i] = land(i)
            q, k, v, gate = _before_attention(layer, hidden_of[i], *tables[i])
            if i == 0:
                first_kv = (k, v)
            else:  # the second nano-batch's tasks also read the first one's kv
                k, v = torch.cat([first_kv[0], k]), torch.cat([first_kv[1], v])
            exchange.send(i, q, k, v)
            gates.append(gate)
        exchange.serve()
        pending = [(layer, gates[i], hidden_of[i]) for i in (0, 1)]
    hidden_of = [land(i) for i in (0, 1)]
    return torch.cat(hidden_of).index_select(0, exchange.order)


def staggered_stage_forward(model: GPTModel, runtime: AttentionRuntime, tokens: torch.Tensor,
                            hidden_in: torch.Tensor | None = None,
                            labels: torch.Tensor | None = None) -> torch.Tensor:
    """``model(tokens, None, None, labels=labels)`` of one pipeline stage, layers staggered.

    tokens (1, T) int64; ``hidden_in`` (T, 1, H) is the previous stage's output (stages after
    the first). Returns per-token losses (1, T) fp32 on the last stage, else hidden (T, 1, H).
    """
    decoder = model.decoder
    hidden = model.embedding(input_ids=tokens, position_ids=None) if model.pre_process \
        else hidden_in
    if len(decoder.layers):
        hidden = staggered_layers(decoder.layers, hidden, runtime)
    return language_model_losses(model, hidden, labels) if model.post_process else hidden


def language_model_losses(model: GPTModel, hidden: torch.Tensor, labels: torch.Tensor
                          ) -> torch.Tensor:
    """The last stage's tail of ``model``'s forward: final norm, output layer and per-token
    losses (1, T) fp32 of the decoder's output hidden (T, 1, H)."""
    hidden = model.decoder.final_layernorm(hidden)
    weight = (model.shared_embedding_or_output_weight()
              if model.share_embeddings_and_output_weights else None)
    logits, _ = model.output_layer(hidden, weight=weight)
    return model.compute_language_model_loss(labels, logits)
