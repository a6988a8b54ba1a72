"""Pipeline schedules over torch.distributed p2p: explicit 1F1B, and lock-step ticks.

**1F1B** (:func:`run_1f1b`). Pipeline stage ``s`` of ``S`` runs ``min(S - s - 1, M)`` warm-up
forwards, then alternates one forward and one backward until its ``M`` micro-batches are all
forwarded, then drains the remaining backwards. Activations (forward) and their gradients
(backward) of one fixed shape travel between neighbouring stages; every exchange that could wait
on the other side posts both its send and its receive before waiting (megatron's pairing), so no
ordering of blocking calls can deadlock. The engine runs it with colocated attention only
(disaggregated attention takes the lock-step schedule); ranks in the bubble sit idle.

**Lock-step** (:func:`run_lockstep`, playing the timetable of
:func:`distca.scheduler.pipeline_sim.lockstep_ticks`, which the step-time simulator plays too):
design §5 wants ranks idle in the bubble to serve other stages' attention, so every rank must
join every attention exchange. Time is cut into ticks; in each tick every stage runs the
forward of one micro-batch, the backward of one, or nothing. The timetable keeps each stage's
1F1B order (so at most ``S`` micro-batches are in flight per stage) and places an operation in
the first tick after its input exists: a forward after the previous stage's forward of that
micro-batch, a backward after the next stage's backward. With ``L/S`` layers on every stage, the ``c``-th attention call of
every stage in a tick (forward layer ``c``, or backward layer ``L/S-1-c``; a bubble rank calls
the tick's ``L/S`` serve-only rounds) is one collective round of all ranks (see
:mod:`distca.parallel.lockstep`). After a tick's compute, neighbours exchange that tick's
outputs: a stage receives exactly when its neighbour produced something for it in that tick,
which every rank reads off the same timetable. The price against 1F1B: a stage never runs ahead
of the tick, so a short backward waits for the longest operation of the tick.

Why not megatron's ``get_forward_backward_func``: megatron-core 0.16.1's pipelined schedule
allocates its token counter with a literal ``device="cuda"`` and its batched p2p calls
``torch.cuda.synchronize()``, so it cannot run on CPU without patching inside its functions;
these schedules have nothing CUDA-specific.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from distca.scheduler.pipeline_sim import BACKWARD, FORWARD, TickRow

# forward(i, hidden_in or None) -> hidden_out on every stage but the last, the micro-batch's
# scalar loss on the last stage.
StageForward = Callable[[int, torch.Tensor | None], torch.Tensor]


@dataclass
class StageLinks:
    """Where a stage's neighbours are (global ranks; None at the ends) and what travels."""

    prev_rank: int | None
    next_rank: int | None
    shape: tuple[int, ...]  # activation shape, e.g. (tokens, 1, hidden)
    dtype: torch.dtype
    device: torch.device

    @property
    def is_first(self) -> bool:
        return self.prev_rank is None

    @property
    def is_last(self) -> bool:
        return self.next_rank is None


def _exchange(sends: list[tuple[torch.Tensor, int]], recv_from: int | None,
              links: StageLinks) -> torch.Tensor | None:
    """Post every send and the receive (if any), then wait for all; returns the received tensor."""
    works = [dist.isend(t.contiguous(), dst) for t, dst in sends]
    received = None
    if recv_from is not None:
        received = torch.empty(links.shape, dtype=links.dtype, device=links.device)
        works.append(dist.irecv(received, recv_from))
    for work in works:
        work.wait()
    return received


def recv_forward(links: StageLinks) -> torch.Tensor | None:
    """The previous stage's activation (``links.shape``, a leaf that takes a gradient);
    None on the first stage."""
    if links.is_first:
        return None
    return _exchange([], links.prev_rank, links).requires_grad_()


def send_forward(out: torch.Tensor, links: StageLinks) -> None:
    """This stage's output activation to the next stage (nothing on the last)."""
    if not links.is_last:
        _exchange([(out.detach(), links.next_rank)], None, links)


def _send_forward_recv_backward(out: torch.Tensor, links: StageLinks) -> torch.Tensor | None:
    if links.is_last:
        return None
    return _exchange([(out.detach(), links.next_rank)], links.next_rank, links)


def send_backward(grad: torch.Tensor | None, links: StageLinks) -> None:
    """The gradient of this stage's input activation to the previous stage (nothing on the
    first)."""
    if not links.is_first:
        _exchange([(grad, links.prev_rank)], None, links)


def _send_backward_recv_forward(grad: torch.Tensor | None, links: StageLinks
                                ) -> torch.Tensor | None:
    if links.is_first:
        return None
    return _exchange([(grad, links.prev_rank)], links.prev_rank, links).requires_grad_()


def recv_backward(links: StageLinks) -> torch.Tensor | None:
    """The gradient of this stage's output from the next stage; None on the last."""
    if links.is_last:
        return None
    return _exchange([], links.next_rank, links)


def _backward(inp: torch.Tensor | None, out: torch.Tensor, grad: torch.Tensor | None
              ) -> torch.Tensor | None:
    """Backward of one micro-batch's stage; returns the gradient of its input activation."""
    torch.autograd.backward(out, grad_tensors=grad)
    return None if inp is None else inp.grad


def run_1f1b(forward: StageForward, num_micro_batches: int, stage: int, num_stages: int,
             links: StageLinks) -> None:
    """Forward and backward of ``num_micro_batches`` through this stage in 1F1B order.

    Gradients accumulate in the parameters' ``.grad``; the last stage back-propagates each
    micro-batch's loss as returned by ``forward`` (scale it there, and keep it if needed).
    """
    warmup = min(num_stages - stage - 1, num_micro_batches)
    steady = num_micro_batches - warmup
    inputs: list[torch.Tensor | None] = []
    outputs: list[torch.Tensor] = []

    def step_forward(i: int, inp: torch.Tensor | None) -> torch.Tensor:
        out = forward(i, inp)
        inputs.append(inp)
        outputs.append(out)
        return out

    for i in range(warmup):
        send_forward(step_forward(i, recv_forward(links)), links)
    inp = recv_forward(links) if steady else None
    for j in range(steady):
        out = step_forward(warmup + j, inp)
        grad_out = _send_forward_recv_backward(out, links)
        grad_in = _backward(inputs.pop(0), outputs.pop(0), grad_out)
        if j == steady - 1:
            send_backward(grad_in, links)
        else:
            inp = _send_backward_recv_forward(grad_in, links)
    for _ in range(warmup):
        grad_out = recv_backward(links)
        send_backward(_backward(inputs.pop(0), outputs.pop(0), grad_out), links)


@torch.no_grad()
def run_forward_only(forward: StageForward, num_micro_batches: int,
                     links: StageLinks) -> list[torch.Tensor]:
    """Forward of every micro-batch through this stage (evaluation); losses on the last stage."""
    losses = []
    for i in range(num_micro_batches):
        out = forward(i, recv_forward(links))
        if links.is_last:
            losses.append(out.detach())
        else:
            send_forward(out, links)
    return losses


class TickServer(Protocol):
    """The attention side of a lock-step tick (:class:`distca.parallel.lockstep.LockstepExchange`)."""

    def begin_tick(self, row: TickRow) -> None: ...

    def serve_idle(self) -> None: ...

    def end_tick(self) -> None: ...


def run_lockstep(forward: StageForward, timetable: list[TickRow], stage: int, links: StageLinks,
                 server: TickServer, train: bool = True) -> None:
    """Run this stage's part of ``timetable`` (forward and, if ``train``, backward).

    Gradients accumulate in the parameters' ``.grad``; the last stage back-propagates what
    ``forward`` returns. In a tick where this stage has nothing to do it serves attention.
    """
    inputs: dict[int, torch.Tensor | None] = {}
    outputs: dict[int, torch.Tensor] = {}
    activations: dict[int, torch.Tensor] = {}  # received from the previous stage
    grads: dict[int, torch.Tensor] = {}  # received from the next stage
    for row in timetable:
        server.begin_tick(row)
        op = row[stage]
        sends = []
        if op is None:
            server.serve_idle()
        elif op.kind is FORWARD:
            i = op.micro_batch
            inp = activations.pop(i, None)
            out = forward(i, inp)
            if train:
                inputs[i], outputs[i] = inp, out
            if not links.is_last:
                sends.append((out.detach(), links.next_rank))
        else:
            i = op.micro_batch
            grad_in = _backward(inputs.pop(i), outputs.pop(i), grads.pop(i, None))
            if not links.is_first:
                sends.append((grad_in, links.prev_rank))
        server.end_tick()
        prev = None if links.is_first else row[stage - 1]
        after = None if links.is_last else row[stage + 1]
        works = [dist.isend(t.contiguous(), dst) for t, dst in sends]
        receives = []
        for neighbour, kind, store in ((prev, FORWARD, activations), (after, BACKWARD, grads)):
            if neighbour is not None and neighbour.kind is kind:
                buffer = torch.empty(links.shape, dtype=links.dtype, device=links.device)
                src = links.prev_rank if kind is FORWARD else links.next_rank
                works.append(dist.irecv(buffer, src))
                receives.append((store, neighbour.micro_batch, buffer))
        for work in works:
            work.wait()
        for store, i, buffer in receives:
            store[i] = buffer.requires_grad_(train and store is activations)
