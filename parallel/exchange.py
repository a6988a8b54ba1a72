"""The one exchange interface: how a rank's attention travels to its servers and back (design §5).

An :class:`Exchange` is one rank's view of one micro-batch's attention exchanges (or, in the
lock-step pipeline, of a whole step's rounds): how q/k/v of its tokens' CA-tasks reach their
servers, how this rank serves the tasks it holds, and how out + lse (forward) and dq/dk/dv
(backward) come back. Every rank of the exchange group — worker or dedicated server — calls the
same methods in the same order, which is what lines the collectives up.

Two ways to drive one:

* **per layer** (``staggered = False``): the layer's core attention calls :meth:`attend` with the
  rank's q, k, v and gets the merged (out, lse) back (blocking as seen by the caller;
  :class:`BlockingExchange`, :class:`TaskPingPong`, :class:`LockstepRounds`);
* **staggered** (``staggered = True``): the rank's tokens are two causally closed nano-batches
  (:mod:`distca.parallel.nanobatch`) whose layers interleave, so :meth:`phases` hands the layer
  driver (:func:`distca.model.staggered.staggered_layers`) the three phases of a layer —
  send a nano-batch, serve, land a nano-batch (:class:`TokenPingPong`,
  :class:`LockstepPingPong`).

Implementations are built by one factory, :class:`distca.exchanges.ExchangeFactory`, from the
config; nothing else needs to know which one it holds.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist
from distca.parallel.dispatch import AttendFn, dispatch_attention, merge_partials
from distca.parallel.layout import DispatchLayout
from distca.parallel.lockstep import LockstepExchange
from distca.parallel.lockstep_worker import LockstepNanoExchange, lockstep_attention
from distca.parallel.nanobatch import NanoBatches
from distca.parallel.pingpong import (
    pingpong_attention,
    receive_results,
    send_qkv,
    serve_and_return,
)


class NanoPhases(Protocol):
    """The phases of one staggered layer over two nano-batches ``i`` = 0, 1.

    ``rows[i]`` (n_i,) int64: this rank's local token rows of nano-batch ``i``; ``order`` (T,)
    int64: each local token's place in ``cat(rows)``. Per layer the driver calls ``send(0, …)``,
    ``send(1, …)``, ``serve()``, and later ``land(i, …)`` for each nano-batch.
    """

    rows: tuple[torch.Tensor, torch.Tensor]
    order: torch.Tensor

    def send(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None: ...

    def serve(self) -> None: ...

    def land(self, i: int, num_rows: int, hq: int, d: int
             ) -> tuple[torch.Tensor, torch.Tensor]: ...


class Exchange:
    """One rank's attention exchanges of a micro-batch (see the module docstring)."""

    staggered = False  # True: drive it through phases(), False: through attend()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: AttendFn,
               softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer: q (N, hq, d), k and v (N, hkv, d) of this rank's N tokens (N = 0 on a
        dedicated server) -> merged (out (N, hq, d) in q's dtype, lse (N, hq) fp32), no sink.
        ``kernel`` runs the tasks this rank serves."""
        raise RuntimeError(f"{type(self).__name__} runs whole layers staggered "
                           "(distca.model.staggered), not one attention call at a time")

    def phases(self, kernel: AttendFn, softmax_scale: float) -> NanoPhases:
        """The staggered phases of one stage forward (``staggered`` exchanges only)."""
        raise RuntimeError(f"{type(self).__name__} exchanges one attention call at a time")


class BlockingExchange(Exchange):
    """One all-to-all out and one back per layer (``cad.ping_pong=false``, or colocated)."""

    def __init__(self, layout: DispatchLayout, group: dist.ProcessGroup | None) -> None:
        self.layout, self.group = layout, group

    def attend(self, q, k, v, kernel, softmax_scale):
        return dispatch_attention(q, k, v, self.layout, kernel, self.group)


class TaskPingPong(Exchange):
    """Every server's tasks split into two halves whose exchanges overlap each other's
    attention (:func:`~distca.parallel.pingpong.pingpong_attention`)."""

    def __init__(self, layouts: tuple[DispatchLayout, DispatchLayout],
                 group: dist.ProcessGroup | None) -> None:
        self.layouts, self.group = layouts, group

    def attend(self, q, k, v, kernel, softmax_scale):
        return pingpong_attention(q, k, v, self.layouts, kernel, self.group)


class TokenPingPong(Exchange):
    """Two token nano-batches whose exchanges overlap each other's linear layers."""

    staggered = True

    def __init__(self, nano: NanoBatches, group: dist.ProcessGroup | None) -> None:
        self.nano, self.group = nano, group

    def phases(self, kernel, softmax_scale):
        return _TokenPhases(self.nano, kernel, self.group)


class _TokenPhases:
    """:class:`NanoPhases` of :class:`TokenPingPong`: send each nano-batch, serve both, land."""

    def __init__(self, nano: NanoBatches, kernel: AttendFn, group) -> None:
        self.nano, self.rows, self.order = nano, nano.rows, nano.order
        self.kernel, self.group = kernel, group
        self.sent: list = [None, None]
        self.returned: list = [None, None]

    def send(self, i, q, k, v):
        self.sent[i] = (send_qkv(q, k, v, self.nano.layouts[i], self.group),
                        (q.shape[1], k.shape[1], q.shape[2]))

    def serve(self):
        for i, (exchange, shape) in enumerate(self.sent):
            self.returned[i] = serve_and_return(exchange, self.nano.layouts[i], self.kernel,
                                                shape, self.group)

    def land(self, i, num_rows, hq, d):
        layout = self.nano.layouts[i]
        out_r, lse_r = receive_results(self.returned[i], layout, hq, d)
        return merge_partials(out_r, lse_r, layout.merge_index, num_rows)


class LockstepRounds(Exchange):
    """The lock-step pipeline's exchange: each layer is one blocking round of every stage's
    ranks (:mod:`distca.parallel.lockstep`); the step's ticks are set on ``rounds``."""

    def __init__(self, rounds: LockstepExchange) -> None:
        self.rounds = rounds

    def attend(self, q, k, v, kernel, softmax_scale):
        return lockstep_attention(self.rounds, q, k, v, softmax_scale)


class LockstepPingPong(Exchange):
    """The lock-step pipeline's exchange with two token nano-batches per job (two sub-rounds
    per round)."""

    staggered = True

    def __init__(self, rounds: LockstepExchange) -> None:
        self.rounds = rounds

    def phases(self, kernel, softmax_scale):
        return LockstepNanoExchange(self.rounds, softmax_scale)


__all__ = ["BlockingExchange", "Exchange", "LockstepPingPong", "LockstepRounds", "NanoPhases",
           "TaskPingPong", "TokenPingPong"]
