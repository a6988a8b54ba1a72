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
from distca.parallel.dispatch import AttendFn, dispatch_attention
from distca.parallel.layout import DispatchLayout
from distca.parallel.lockstep import LockstepExchange
from distca.parallel.lockstep_worker import lockstep_attention
from distca.parallel.nanobatch import NanoBatches
from distca.parallel.pingpong import pingpong_attention


class AttentionRuntime:
    """Routes core attention of the current micro-batch through its dispatch layout."""

    def __init__(self, rope_theta: float, backend: str = "auto",
                 group: dist.ProcessGroup | None = None) -> None:
        self.rope_theta = rope_theta
        self.backend = backend
        self.group = group
        self.positions: torch.Tensor | None = None
        # One layout (blocking exchange), two task nano-batch layouts (ping-pong inside the
        # attention call), token nano-batches (ping-pong over whole layers, driven by
        # distca.model.staggered), or the lock-step pipeline's cross-stage exchange (blocking
        # rounds here, or token nano-batches driven by distca.model.staggered).
        self.layout: DispatchLayout | tuple[DispatchLayout, DispatchLayout] | NanoBatches \
            | LockstepExchange | None = None
        self.telemetry: SinkTelemetry | None = None
        self._rope_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # Wall seconds of this rank, summed over layers: "serve" / "serve_bwd" = its server
        # kernels in forward / backward ("serve_cpu": their CPU seconds, both passes), "attend" = the whole forward dispatch (exchange +
        # waiting + serving + merge), "comm_wait" = blocked on exchanges, forward and backward
        # (exposed communication). None turns the clocks off.
        self.timings: dict[str, float] | None = None

    def set_batch(self, positions: torch.Tensor,
                  layout: DispatchLayout | tuple[DispatchLayout, DispatchLayout] | NanoBatches
                  | LockstepExchange) -> None:
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
        if self.layout is None:
            raise RuntimeError("AttentionRuntime.set_batch was not called before the forward")
        if isinstance(self.layout, LockstepExchange):  # pipeline ticks: rounds of all stages
            return lockstep_attention(self.layout, q, k, v, softmax_scale)
        if isinstance(self.layout, NanoBatches):
            raise RuntimeError("token nano-batches run whole layers staggered "
                               "(distca.model.staggered), not one attention call at a time")
        start = time.perf_counter()
        run = self.kernel(softmax_scale)
        if isinstance(self.layout, tuple):
            result = pingpong_attention(q, k, v, self.layout, run, self.group, self.timings)
        else:
            result = dispatch_attention(q, k, v, self.layout, run, self.group, self.timings)
        self._clock("attend", start)
        return result

    def kernel(self, softmax_scale: float) -> AttendFn:
        """The server-side attention of this runtime's backend (clocked when timings are on)."""
        from distca.attention import core_attention

        def run(sq, sk, sv, q_ranges, kv_ranges, causal):
            def kernel(*qkv):
                return core_attention(*qkv, q_ranges, kv_ranges, causal,
                                      softmax_scale=softmax_scale, backend=self.backend)

            if self.timings is None:
                return kernel(sq, sk, sv)
            return _ClockedKernel.apply(self.timings, kernel, sq, sk, sv)

        return run

    def _clock(self, key: str, start: float) -> None:
        if self.timings is not None:
            _add(self.timings, key, start)


def _add(timings: dict[str, float], key: str, start: float) -> None:
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def _add_cpu(timings: dict[str, float], start: float) -> None:
    timings["serve_cpu"] = timings.get("serve_cpu", 0.0) + time.thread_time() - start


class _ClockedKernel(torch.autograd.Function):
    """Runs ``kernel(q, k, v) -> (out, lse)`` as a private sub-graph so that its forward and
    backward each show up as one timed interval (autograd may otherwise interleave other nodes)."""

    @staticmethod
    def forward(ctx, timings, kernel, q, k, v):
        start = time.perf_counter()
        cpu0 = time.thread_time()
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in (q, k, v)]
        with torch.enable_grad():
            out, lse = kernel(*inputs)
        ctx.timings, ctx.inputs, ctx.outputs = timings, inputs, (out, lse)
        _add(timings, "serve", start)
        _add_cpu(timings, cpu0)
        return out.detach(), lse.detach()

    @staticmethod
    def backward(ctx, dout, dlse):
        start, cpu0 = time.perf_counter(), time.thread_time()
        wanted = [t for t in ctx.inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(ctx.outputs, wanted, (dout, dlse), allow_unused=True)
                     if wanted and ctx.outputs[0].requires_grad else [])
        result = [next(grads) if t.requires_grad else None for t in ctx.inputs]
        ctx.inputs = ctx.outputs = None
        _add(ctx.timings, "serve_bwd", start)
        _add_cpu(ctx.timings, cpu0)
        return (None, None, *result)
