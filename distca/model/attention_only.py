"""A dedicated attention server's model: the same layers with nothing but their attention.

With ``cad.server_mode=dedicated`` the ranks after the workers hold no tokens and no weights;
the planner gives them a share of every layer's CA-tasks. A server runs the very same step as a
worker (:mod:`distca.step`), with this :class:`~distca.model.stage.StageModel` in place of the
megatron model and zero tokens of its own: each layer turns its (empty) input into empty
q, k, v, attends through the step's exchange — which is where the server receives its tasks'
q/k/v, computes them and returns out + lse — and folds the (empty) result into its output.
The empty tensors keep the autograd graph of a worker's: backward visits the layers' exchanges
in the same reverse order, so the server joins every backward exchange too, and FocuSFT's inner
``torch.autograd.grad`` reaches exactly the adapted layers' exchanges through :attr:`anchor`,
which stands where the fast weights sit on a worker.

Hidden states here are (0, 1, 1) fp32; q, k, v take the model dtype, as the all-to-all buffers
must match the workers'.
"""

from __future__ import annotations

import torch

from distca.model.runtime import AttentionRuntime


class AttentionOnlyLayer:
    """:class:`~distca.model.stage.StageLayer` of a dedicated server."""

    def __init__(self, stage: AttentionOnlyStage, fast: bool) -> None:
        self.stage, self.fast = stage, fast
        self.heads, self.head_dim = stage.heads, stage.head_dim
        self.softmax_scale = stage.head_dim ** -0.5

    def __call__(self, hidden):
        return self.mlp_block(self.attention_block(hidden))

    def attention_block(self, hidden):
        q, k, v, _ = self.before_attention(hidden, None, None)
        out, lse = self.stage.runtime.attend(q, k, v, self.softmax_scale)
        return self._fold(out, lse, hidden)

    def mlp_block(self, hidden):
        # a worker's fast weights sit on the adapted layers' MLP: so does the anchor here
        return hidden * self.stage.anchor if self.fast else hidden

    def before_attention(self, hidden, cos, sin):
        s = self.stage
        empty = hidden.reshape(0, 1, 1).to(s.dtype)
        return (empty.expand(0, s.heads, s.head_dim), empty.expand(0, s.kv_heads, s.head_dim),
                empty.expand(0, s.kv_heads, s.head_dim), None)

    def after_attention(self, out, lse, gate, residual):
        return self.mlp_block(self.attention_out(out, lse, gate, residual))

    def attention_out(self, out, lse, gate, residual):
        return self._fold(out, lse, residual)

    @staticmethod
    def _fold(out: torch.Tensor, lse: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return residual + (out.float().sum() + lse.float().sum())


class AttentionOnlyStage:
    """:class:`~distca.model.stage.StageModel` of a dedicated server (module docstring).

    ``heads``/``kv_heads``/``head_dim``: the model's attention shape; ``fast_layers``: how many
    of the top layers carry FocuSFT fast weights on the workers (0 without FocuSFT).
    """

    pre_process = post_process = True  # dedicated servers exist only with pp = 1
    row_group = None  # and tp = 1

    def __init__(self, runtime: AttentionRuntime, num_layers: int, heads: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, fast_layers: int = 0) -> None:
        self.runtime, self.dtype = runtime, dtype
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        # FocuSFT's stand-in for the fast weights: the inner loop differentiates with respect
        # to it (a 0-d fp32 one; multiplying by it changes no value)
        self.anchor = torch.ones((), requires_grad=True)
        self.layers = [AttentionOnlyLayer(self, fast=i >= num_layers - fast_layers)
                       for i in range(num_layers)]

    def forward(self, tokens, hidden_in, labels):
        hidden = self.embed(tokens, hidden_in)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.losses(hidden, labels)

    def embed(self, tokens, hidden_in):
        return torch.zeros(0, 1, 1, requires_grad=torch.is_grad_enabled())

    def losses(self, hidden, labels):
        return hidden.reshape(1, 0)
