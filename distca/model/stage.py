"""One pipeline stage of the model, as the step schedule sees it (the interface).

The step (:mod:`distca.step`, :mod:`distca.focusft.step`) and the staggered layer driver
(:mod:`distca.model.staggered`) run a stage through the small interface below, never through
megatron directly. :class:`distca.model.megatron_adapter.MegatronStage` implements it on
megatron-core's ``GPTModel``; :class:`distca.model.attention_only.AttentionOnlyStage`
implements it for a dedicated attention server, which has the same layers with nothing but
their attention exchanges. Because both run the same step code, every collective of a
worker's step reaches the servers by construction.
"""

from __future__ import annotations

from typing import Protocol

import torch


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

    def attention_out(self, out: torch.Tensor, lse: torch.Tensor, gate: torch.Tensor | None,
                      residual: torch.Tensor) -> torch.Tensor:
        """:meth:`after_attention` without the MLP block: :meth:`attention_block`'s output."""


class StageModel(Protocol):
    """One pipeline stage's model (module docstring)."""

    layers: list[StageLayer]
    pre_process: bool  # the first stage: it embeds tokens
    post_process: bool  # the last stage: it computes losses
    # sequence parallelism: the group whose ranks each hold 1/tp of the hidden rows (embed's
    # output, forward's input and output between stages), else None
    row_group: object | None

    def forward(self, tokens: torch.Tensor, hidden_in: torch.Tensor | None,
                labels: torch.Tensor | None) -> torch.Tensor:
        """tokens (1, T) int64; ``hidden_in`` (T, 1, H) from the previous stage. Per-token
        losses (1, T) fp32 on the last stage, else the output hidden (T, 1, H)."""

    def embed(self, tokens: torch.Tensor, hidden_in: torch.Tensor | None) -> torch.Tensor:
        """The first layer's input: embedded tokens, or ``hidden_in`` on later stages."""

    def losses(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Final norm, output layer and per-token losses (1, T) fp32 of the decoder output."""


