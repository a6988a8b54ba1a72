"""One pipeline stage of the model, as the step schedule sees it: the megatron-core adapter.

The step (:mod:`distca.step`, :mod:`distca.focusft.step`) and the staggered layer driver
(:mod:`distca.model.staggered`) run a stage through the small interface below, never through
megatron directly. :class:`MegatronStage` implements it on megatron-core's ``GPTModel``;
:class:`distca.model.attention_only.AttentionOnlyStage` implements it for a dedicated attention
server, which has the same layers with nothing but their attention exchanges. Because both
run the same step code, every collective of a worker's step reaches the servers by
construction.

Every megatron-core private name distca calls is in this file (``_forward_attention``,
``_forward_mlp``, ``_apply_output_gate``, ``bias_dropout_add_exec_handler``), written against
megatron-core 0.16 (``tests`` pins the range: :data:`MEGATRON_CORE_RANGE`). The layer halves
call megatron's own submodules in the order of its ``TransformerLayer.forward`` and
``SelfAttention.forward`` (no recompute, offload or inference paths, which distca does not use),
so a staggered stage computes exactly what megatron's forward computes.
"""

from __future__ import annotations

from typing import Protocol

import torch
from megatron.core.models.gpt import GPTModel

from distca.model.rope import apply_rope

MEGATRON_CORE_RANGE = ("0.16.1", "0.17")  # [first, last) megatron-core versions this fits


class StageLayer(Protocol):
    """One transformer layer, whole or in halves. Hidden states are (n, 1, H)."""

    heads: int  # query heads on this rank
    head_dim: int
    softmax_scale: float

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def attention_block(self, hidden: torch.Tensor) -> torch.Tensor:
        """Norm, attention, output projection and residual: the MLP block's input."""

    def mlp_block(self, hidden: torch.Tensor) -> torch.Tensor:
        """Norm, MLP and residual of :meth:`attention_block`'s output."""

    def before_attention(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(q (n, hq, d), k, v (n, hkv, d), gate or None), RoPE applied."""

    def after_attention(self, out: torch.Tensor, lse: torch.Tensor, gate: torch.Tensor | None,
                        residual: torch.Tensor) -> torch.Tensor:
        """The layer's output hidden from merged attention (out (n, hq, d), lse (n, hq) fp32)."""


class StageModel(Protocol):
    """One pipeline stage's model (module docstring)."""

    layers: list[StageLayer]
    pre_process: bool  # the first stage: it embeds tokens
    post_process: bool  # the last stage: it computes losses

    def forward(self, tokens: torch.Tensor, hidden_in: torch.Tensor | None,
                labels: torch.Tensor | None) -> torch.Tensor:
        """tokens (1, T) int64; ``hidden_in`` (T, 1, H) from the previous stage. Per-token
        losses (1, T) fp32 on the last stage, else the output hidden (T, 1, H)."""

    def embed(self, tokens: torch.Tensor, hidden_in: torch.Tensor | None) -> torch.Tensor:
        """The first layer's input: embedded tokens, or ``hidden_in`` on later stages."""

    def losses(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Final norm, output layer and per-token losses (1, T) fp32 of the decoder output."""


class MegatronLayer:
    """:class:`StageLayer` of a megatron-core ``TransformerLayer`` with distca core attention."""

    def __init__(self, layer) -> None:
        self.layer = layer
        core = layer.self_attention.core_attention
        self.heads, self.head_dim, self.softmax_scale = core.heads, core.head_dim, core.softmax_scale

    def __call__(self, hidden):
        return self.layer(hidden_states=hidden, attention_mask=None)[0]

    def attention_block(self, hidden):
        return self.layer._forward_attention(hidden_states=hidden, attention_mask=None)[0]

    def mlp_block(self, hidden):
        return self.layer._forward_mlp(hidden)

    def before_attention(self, hidden, cos, sin):
        attn = self.layer.self_attention
        n = hidden.shape[0]
        if n == 0:
            # A worker inside one long document can have an empty nano-batch; it still joins
            # the exchanges. megatron's reshape cannot infer the heads of zero rows: run one
            # zero row and keep none of it.
            hidden = hidden.new_zeros(1, *hidden.shape[1:])
        parts = attn.get_query_key_value_tensors(self.layer.input_layernorm(hidden), None,
                                                 output_gate=attn.config.attention_output_gate,
                                                 split_qkv=True)
        q, k, v = (x[:n, 0] for x in parts[:3])
        gate = parts[3][:n] if len(parts) == 4 else None
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v.contiguous(), gate

    def after_attention(self, out, lse, gate, residual):
        layer = self.layer
        attn = layer.self_attention
        context = attn.core_attention.finish(out, lse)
        if gate is not None:
            context = attn._apply_output_gate(context, gate)
        with layer.bias_dropout_add_exec_handler():
            hidden = layer.self_attn_bda(layer.training, layer.config.bias_dropout_fusion)(
                attn.linear_proj(context), residual, layer.hidden_dropout)
        return layer._forward_mlp(hidden)


class MegatronStage:
    """:class:`StageModel` of this stage's megatron-core ``GPTModel``."""

    def __init__(self, model: GPTModel) -> None:
        self.model = model
        self.layers = [MegatronLayer(layer) for layer in model.decoder.layers]
        self.pre_process, self.post_process = model.pre_process, model.post_process

    def forward(self, tokens, hidden_in, labels):
        if not self.pre_process:
            self.model.set_input_tensor(hidden_in)
        return self.model(tokens, None, None, labels=labels)

    def embed(self, tokens, hidden_in):
        return self.model.embedding(input_ids=tokens, position_ids=None) if self.pre_process \
            else hidden_in

    def losses(self, hidden, labels):
        model = self.model
        hidden = model.decoder.final_layernorm(hidden)
        weight = (model.shared_embedding_or_output_weight()
                  if model.share_embeddings_and_output_weights else None)
        logits, _ = model.output_layer(hidden, weight=weight)
        return model.compute_language_model_loss(labels, logits)
