"""Per-step state shared by every core-attention submodule of one model replica.

The step sets it once per micro-batch (or nano-batch): the tokens' logical positions and the
:class:`~distca.parallel.exchange.Exchange` of the step's plan. The submodules only call
:meth:`AttentionRuntime.rope` and :meth:`AttentionRuntime.attend`; the staggered layer driver
asks :meth:`AttentionRuntime.phases`.
"""

from __future__ import annotations

import torch

from distca.attention import core_attention
from distca.model.probe import AttentionProbe
from distca.model.rope import rope_tables
from distca.parallel.dispatch import AttendFn
from distca.parallel.exchange import Exchange, NanoPhases
from distca.parallel.spans import is_recording, span
from distca.rope_scaling import RopeScalingConfig


class AttentionRuntime:
    """Routes core attention of the current micro-batch through its exchange."""

    def __init__(self, rope_theta: float, backend: str = "auto",
                 rope_scaling: RopeScalingConfig | None = None) -> None:
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.backend = backend
        self.positions: torch.Tensor | None = None
        self.exchange: Exchange | None = None
        self.probe: AttentionProbe | None = None  # set while the step measures statistics
        self._rope_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def set_batch(self, positions: torch.Tensor, exchange: Exchange) -> None:
        """positions (N,) int64: logical position of each of this rank's tokens (N = 0 on a
        dedicated server); ``exchange``: how their attention travels this micro-batch."""
        self.positions = positions
        self.exchange = exchange
        self._rope_cache = {}

    @property
    def staggered(self) -> bool:
        """Whether layers must run as two staggered token nano-batches (:meth:`phases`)."""
        return self._current().staggered

    def rope(self, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        if head_dim not in self._rope_cache:
            self._rope_cache[head_dim] = rope_tables(self.positions, head_dim, self.rope_theta,
                                                       self.rope_scaling)
        return self._rope_cache[head_dim]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
               sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Merged (out (N, hq, d), lse (N, hq) fp32) of this rank's tokens, without the sink
        (``sinks`` (hq,), the layer's learnable sink logits, only feed the statistics)."""
        exchange, kernel = self._current(), self.kernel(softmax_scale)
        with span("attend"):
            out, lse = exchange.attend(q, k, v, kernel, softmax_scale)
        if self.probe is not None:
            def attend(q_, k_, v_):  # the context mass: one more pass through the exchange
                return exchange.attend(q_, k_, v_, kernel, softmax_scale)

            self.probe.observe(q, k, lse, attend, sinks, softmax_scale)
        return out, lse

    def phases(self, softmax_scale: float) -> NanoPhases:
        """The staggered phases of one stage forward of the current exchange."""
        return self._current().phases(self.kernel(softmax_scale), softmax_scale)

    def kernel(self, softmax_scale: float) -> AttendFn:
        """The server-side attention of this runtime's backend (spans ``serve``/``serve_bwd``
        while spans are recorded)."""
        def run(sq, sk, sv, q_ranges, kv_ranges, causal):
            def kernel(*qkv):
                return core_attention(*qkv, q_ranges, kv_ranges, causal,
                                      softmax_scale=softmax_scale, backend=self.backend)

            if not is_recording():
                return kernel(sq, sk, sv)
            return _SpannedKernel.apply(kernel, sq, sk, sv)

        return run

    def _current(self) -> Exchange:
        if self.exchange is None:
            raise RuntimeError("AttentionRuntime.set_batch was not called before the forward")
        return self.exchange


class _SpannedKernel(torch.autograd.Function):
    """Runs ``kernel(q, k, v) -> (out, lse)`` as a private sub-graph so that its forward and
    backward each show up as one span (autograd may otherwise interleave other nodes)."""

    @staticmethod
    def forward(ctx, kernel, q, k, v):
        with span("serve", cpu=True):
            inputs = [t.detach().requires_grad_(t.requires_grad) for t in (q, k, v)]
            with torch.enable_grad():
                out, lse = kernel(*inputs)
        ctx.inputs, ctx.outputs = inputs, (out, lse)
        return out.detach(), lse.detach()

    @staticmethod
    def backward(ctx, dout, dlse):
        with span("serve_bwd", cpu=True):
            wanted = [t for t in ctx.inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(ctx.outputs, wanted, (dout, dlse), allow_unused=True)
                         if wanted and ctx.outputs[0].requires_grad else [])
            result = [next(grads) if t.requires_grad else None for t in ctx.inputs]
        ctx.inputs = ctx.outputs = None
        return (None, *result)
