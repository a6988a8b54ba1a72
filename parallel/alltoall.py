"""Differentiable variable-split all-to-all over a process group (design §5).

``all_to_all_single`` moves one flat buffer: rank ``r`` sends ``send_counts[d]`` consecutive
elements to rank ``d`` and receives ``recv_counts[s]`` elements from rank ``s``, concatenated in
source order. The backward of that exchange is the same exchange with the counts swapped, so the
gradient of a received element flows back to exactly the element that was sent.

Two flavours share one communication routine:

* :func:`all_to_all` — blocking, one autograd node.
* :func:`start_all_to_all` / :func:`finish_all_to_all` — the collective is launched with
  ``async_op=True`` in the forward of the first node and waited on in the forward of the second;
  in backward the order reverses (the *finish* node launches the gradient exchange, the *start*
  node waits for it). Work scheduled between the two nodes, in either direction, overlaps the
  communication — the basis of ping-pong.

The seconds the calling thread is blocked on an exchange (forward and backward), i.e. the
exposed communication, are the span ``comm_wait`` (:mod:`distca.parallel.spans`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from distca.parallel.spans import span


def launch_all_to_all(flat: torch.Tensor, send_counts: list[int], recv_counts: list[int],
                      group: dist.ProcessGroup | None, async_op: bool):
    """Post the exchange of ``flat`` (not differentiable); returns (output buffer, work handle),
    the handle None unless ``async_op``."""
    out = flat.new_empty(sum(recv_counts))
    work = dist.all_to_all_single(out, flat.contiguous(), output_split_sizes=recv_counts,
                                  input_split_sizes=send_counts, group=group, async_op=async_op)
    return out, work


def wait_all_to_all(work) -> None:
    """Wait for an exchange posted with ``async_op=True`` (span ``comm_wait``)."""
    with span("comm_wait"):
        work.wait()


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, flat, send_counts, recv_counts, group):
        ctx.counts, ctx.group = (send_counts, recv_counts), group
        with span("comm_wait"):
            out, _ = launch_all_to_all(flat, send_counts, recv_counts, group, async_op=False)
        return out

    @staticmethod
    def backward(ctx, grad):
        send_counts, recv_counts = ctx.counts
        with span("comm_wait"):
            out, _ = launch_all_to_all(grad, recv_counts, send_counts, ctx.group, async_op=False)
        return out, None, None, None


def all_to_all(flat: torch.Tensor, send_counts: list[int], recv_counts: list[int],
               group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Blocking differentiable exchange of a 1-D tensor; returns the (sum(recv_counts),) buffer."""
    return _AllToAll.apply(flat, list(send_counts), list(recv_counts), group)


@dataclass
class PendingExchange:
    """An all-to-all in flight, shared by a start node and its finish node."""

    send_counts: list[int]
    recv_counts: list[int]
    group: dist.ProcessGroup | None
    forward: tuple | None = None  # (output buffer, work) of the forward exchange
    backward: tuple | None = field(default=None)  # (output buffer, work) of the gradient exchange


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx, flat, pending):
        pending.forward = launch_all_to_all(flat, pending.send_counts, pending.recv_counts,
                                            pending.group, async_op=True)
        ctx.pending = pending
        # A token output that links this node to the finish node in the autograd graph.
        return flat.new_zeros(())

    @staticmethod
    def backward(ctx, _token_grad):
        grad, work = ctx.pending.backward
        wait_all_to_all(work)
        ctx.pending.backward = None
        return grad, None


class _Finish(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token, pending):
        out, work = pending.forward
        wait_all_to_all(work)
        pending.forward = None
        ctx.pending = pending
        return out

    @staticmethod
    def backward(ctx, grad):
        p = ctx.pending
        p.backward = launch_all_to_all(grad, p.recv_counts, p.send_counts, p.group, async_op=True)
        return torch.zeros((), dtype=grad.dtype), None


def start_all_to_all(flat: torch.Tensor, send_counts: list[int], recv_counts: list[int],
                     group: dist.ProcessGroup | None = None
                     ) -> tuple[torch.Tensor, PendingExchange]:
    """Launch the exchange of ``flat`` without waiting; pass both results to :func:`finish_all_to_all`."""
    pending = PendingExchange(list(send_counts), list(recv_counts), group)
    return _Start.apply(flat, pending), pending


def finish_all_to_all(token: torch.Tensor, pending: PendingExchange) -> torch.Tensor:
    """Wait for an exchange started by :func:`start_all_to_all`; returns the received buffer."""
    return _Finish.apply(token, pending)
