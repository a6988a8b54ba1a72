"""Per-step state shared by every core-attention submodule of one model replica.

The engine sets it once per micro-batch (or nano-batch): the tokens' logical positions, the
dispatch layout of the step's plan, and the exchange group. The submodules only call
:meth:`AttentionRuntime.rope` and :meth:`AttentionRuntime.attend`.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from distca.model.core_attention import SinkTelemetry
from distca.model.rope import rope_tables
from distca.parallel.dispatch import dispatch_attention
from distca.parallel.layout import DispatchLayout
from distca.parallel.pingpong import pingpong_attention


class AttentionRuntime:
    """Routes core attention of the current micro-batch through its dispatch layout."""

    def __init__(self, rope_theta: float, backend: str = "auto",
                 group: dist.ProcessGroup | None = None) -> None:
        self.rope_theta = rope_theta
        self.backend = backend
        self.group = group
        self.positions: torch.Tensor | None = None
        # One layout (blocking exchange) or two nano-batch layouts (ping-pong).
        self.layout: DispatchLayout | tuple[DispatchLayout, DispatchLayout] | None = None
        self.telemetry: SinkTelemetry | None = None
        self._rope_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # Forward wall seconds: "serve" = this rank's server kernels, "attend" = the whole
        # dispatch (exchange + waiting + serving + merge); "comm_wait" = seconds blocked on
        # exchanges, forward and backward (exposed communication). None turns the clocks off.
        self.timings: dict[str, float] | None = None

    def set_batch(self, positions: torch.Tensor,
                  layout: DispatchLayout | tuple[DispatchLayout, DispatchLayout]) -> None:
        """positions (N,) int64: logical position of each of this rank's tokens; ``layout`` is
        one exchange, or a pair of nano-batch exchanges to run ping-pong."""
        self.positions = positions
        self.layout = layout
        self._rope_cache = {}

    def rope(self, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        if head_dim not in self._rope_cache:
            self._rope_cache[head_dim] = rope_tables(self.positions, head_dim, self.rope_theta)
        return self._rope_cache[head_dim]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Merged (out (N, hq, d), lse (N, hq) fp32) of this rank's tokens, without the sink."""
        from distca.attention import core_attention

        def run(sq, sk, sv, q_ranges, kv_ranges, causal):
            start = time.perf_counter()
            result = core_attention(sq, sk, sv, q_ranges, kv_ranges, causal,
                                    softmax_scale=softmax_scale, backend=self.backend)
            self._clock("serve", start)
            return result

        if self.layout is None:
            raise RuntimeError("AttentionRuntime.set_batch was not called before the forward")
        start = time.perf_counter()
        if isinstance(self.layout, tuple):
            result = pingpong_attention(q, k, v, self.layout, run, self.group, self.timings)
        else:
            result = dispatch_attention(q, k, v, self.layout, run, self.group, self.timings)
        self._clock("attend", start)
        return result

    def _clock(self, key: str, start: float) -> None:
        if self.timings is not None:
            self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - start
