"""Per-step state shared by every core-attention submodule of one model replica.

The engine sets it once per micro-batch (or nano-batch): the tokens' logical positions, the
dispatch layout of the step's plan, and the exchange group. The submodules only call
:meth:`AttentionRuntime.rope` and :meth:`AttentionRuntime.attend`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from distca.model.core_attention import SinkTelemetry
from distca.model.rope import rope_tables
from distca.parallel.dispatch import dispatch_attention
from distca.parallel.layout import DispatchLayout


class AttentionRuntime:
    """Routes core attention of the current micro-batch through its dispatch layout."""

    def __init__(self, rope_theta: float, backend: str = "auto",
                 group: dist.ProcessGroup | None = None) -> None:
        self.rope_theta = rope_theta
        self.backend = backend
        self.group = group
        self.positions: torch.Tensor | None = None
        self.layout: DispatchLayout | None = None
        self.telemetry: SinkTelemetry | None = None
        self._rope_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def set_batch(self, positions: torch.Tensor, layout: DispatchLayout) -> None:
        """positions (N,) int64: logical position of each of this rank's tokens."""
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
            return core_attention(sq, sk, sv, q_ranges, kv_ranges, causal,
                                  softmax_scale=softmax_scale, backend=self.backend)

        if self.layout is None:
            raise RuntimeError("AttentionRuntime.set_batch was not called before the forward")
        return dispatch_attention(q, k, v, self.layout, run, self.group)
