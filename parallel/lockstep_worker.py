"""Worker side of the lock-step pipeline's attention rounds (:mod:`distca.parallel.lockstep`).

A worker's attention of one layer is a round of its tick; its backward is a round of a later
tick (the job's backward tick). The autograd nodes here carry the worker's q/k/v out and the
partial rows back, and mirror that in backward:

* :func:`lockstep_attention`: one blocking round per layer (``cad.ping_pong=false``);
* :class:`LockstepNanoExchange`: the two sub-rounds of a ping-pong round as separate *send*
  and *receive* nodes, driven per nano-batch by :func:`distca.model.staggered.staggered_layers`.
  In forward, *send* posts the nano-batch's q/k/v and *receive* waits for its partial rows; in
  backward, *receive* posts dO/dlse (and, after the round's last sub-round, this rank serves
  the round) and *send* waits for dq/dk/dv. Work that autograd runs between the two nodes
  overlaps the transfer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from distca.parallel.dispatch import merge_partials
from distca.parallel.lockstep import Job, LockstepExchange
from distca.scheduler.pipeline_sim import BACKWARD, FORWARD


def lockstep_attention(exchange: LockstepExchange, q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's q (N, hq, d), k/v (N, hkv, d) through one round; merged (out (N, hq, d),
    lse (N, hq) fp32) without sink."""
    if exchange.nanos != 1:
        raise RuntimeError("a ping-pong lock-step exchange runs whole layers staggered "
                           "(distca.model.staggered), not one attention call at a time")
    job = _forward_job(exchange, softmax_scale)
    out_r, lse_r = _RemoteAttention.apply(q, k, v, exchange, job)
    out, lse = _merge(out_r, lse_r, exchange.layouts[job][0].send_q, q.shape[0])
    return out.to(q.dtype), lse


def _forward_job(exchange: LockstepExchange, softmax_scale: float) -> Job:
    if softmax_scale != exchange.softmax_scale:
        raise ValueError(f"softmax_scale {softmax_scale} differs from the exchange's "
                         f"{exchange.softmax_scale} (bubble ranks serve with the latter)")
    role = exchange.roles[exchange.me]
    if role is None or role[0] is not FORWARD:
        raise RuntimeError(f"rank {exchange.me} runs a forward in a tick where its role is {role}")
    return role[1]


def _qkv_chunks(q, k, v, send_q, send_kv) -> list[torch.Tensor]:
    return [torch.cat([q.index_select(0, qi).reshape(-1), k.index_select(0, ki).reshape(-1),
                       v.index_select(0, ki).reshape(-1)]) for qi, ki in zip(send_q, send_kv)]


def _unpack_results(back: list[torch.Tensor], send_q, hq: int, d: int):
    """Partial rows (out (R, hq, d), lse (R, hq)) fp32, in the order of ``cat(send_q)``."""
    outs, lses = [], []
    for flat, qi in zip(back, send_q):
        n = qi.numel()
        outs.append(flat[:n * hq * d].view(n, hq, d))
        lses.append(flat[n * hq * d:].view(n, hq))
    return torch.cat(outs), torch.cat(lses)


def _merge(out_r: torch.Tensor, lse_r: torch.Tensor, send_q: list[torch.Tensor], num_rows: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the partial rows of :func:`_unpack_results` into this rank's ``num_rows`` rows."""
    index = torch.cat(send_q) if send_q else out_r.new_zeros(0, dtype=torch.int64)
    return merge_partials(out_r, lse_r, index, num_rows)


def _grad_chunks(dout, dlse, send_q) -> list[torch.Tensor]:
    sizes = [qi.numel() for qi in send_q]
    return [torch.cat([a.reshape(-1).float(), b.reshape(-1).float()])
            for a, b in zip(dout.split(sizes), dlse.split(sizes))]


def _scatter_grads(back: list[torch.Tensor], send_q, send_kv, q_shape, kv_shape, dtype, device):
    """dq (q_shape), dk, dv (kv_shape) in ``dtype`` from each server's returned rows; kv rows
    sent to several servers sum their gradients."""
    hq, hkv, d = q_shape[1], kv_shape[1], q_shape[2]
    dq = torch.zeros(q_shape, dtype=torch.float32, device=device)
    dk = torch.zeros(kv_shape, dtype=torch.float32, device=device)
    dv = torch.zeros(kv_shape, dtype=torch.float32, device=device)
    for flat, qi, ki in zip(back, send_q, send_kv):
        a, b, c = torch.split(flat, [qi.numel() * hq * d, ki.numel() * hkv * d,
                                     ki.numel() * hkv * d])
        dq.index_add_(0, qi, a.view(-1, hq, d))
        dk.index_add_(0, ki, b.view(-1, hkv, d))
        dv.index_add_(0, ki, c.view(-1, hkv, d))
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)


class _RemoteAttention(torch.autograd.Function):
    """One blocking round: q, k, v out to the servers, partial rows back (and mirrored in
    backward, which runs as a round of the backward tick)."""

    @staticmethod
    def forward(ctx, q, k, v, exchange: LockstepExchange, job: Job):
        lay = exchange.layouts[job][0]
        back = exchange.exchange_round(_qkv_chunks(q, k, v, lay.send_q, lay.send_kv))
        ctx.exchange, ctx.job = exchange, job
        ctx.meta = (q.shape, k.shape, q.dtype)
        out, lse = _unpack_results(back, lay.send_q, q.shape[1], q.shape[2])
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        ex, job = ctx.exchange, ctx.job
        _check_backward(ex, job)
        lay = ex.layouts[job][0]
        back = ex.exchange_round(_grad_chunks(dout, dlse, lay.send_q))
        return (*_scatter_grads(back, lay.send_q, lay.send_kv, *ctx.meta, dout.device),
                None, None)


def _check_backward(ex: LockstepExchange, job: Job) -> None:
    if ex.roles[ex.me] != (BACKWARD, job):
        raise RuntimeError(f"backward of job {job} in a tick where rank {ex.me} is "
                           f"{ex.roles[ex.me]}")


@dataclass
class _Ticket:
    """One nano-batch's exchange of one layer, shared by its send and receive nodes."""

    exchange: LockstepExchange
    job: Job
    nano: int
    forward: tuple[int, int] | None = None  # (round, sub-round) of the forward return
    backward: tuple[int, int] | None = None  # (round, sub-round) of the gradient return


class _SendNano(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ticket: _Ticket):
        ex = ticket.exchange
        lay = ex.layouts[ticket.job][ticket.nano]
        ticket.forward = (ex.round, ticket.nano)
        ex.launch(ticket.nano, _qkv_chunks(q, k, v, lay.send_q, lay.send_kv))
        ctx.ticket, ctx.meta = ticket, (q.shape, k.shape, q.dtype)
        # A token output that links this node to the receive node in the autograd graph.
        return q.new_zeros(())

    @staticmethod
    def backward(ctx, _token_grad):
        t = ctx.ticket
        lay = t.exchange.layouts[t.job][t.nano]
        back = t.exchange.collect(*t.backward)
        return (*_scatter_grads(back, lay.send_q, lay.send_kv, *ctx.meta, _token_grad.device),
                None)


class _ReceiveNano(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token, ticket: _Ticket, hq: int, d: int):
        ex = ticket.exchange
        back = ex.collect(*ticket.forward)
        ctx.ticket = ticket
        return _unpack_results(back, ex.layouts[ticket.job][ticket.nano].send_q, hq, d)

    @staticmethod
    def backward(ctx, dout, dlse):
        t = ctx.ticket
        ex = t.exchange
        _check_backward(ex, t.job)
        sub = ex.nano_of(BACKWARD, t.nano)
        t.backward = (ex.round, sub)
        ex.launch(sub, _grad_chunks(dout, dlse, ex.layouts[t.job][t.nano].send_q))
        if sub == ex.nanos - 1:  # every sub-round of this round is posted: serve it
            ex.serve_round()
        return torch.zeros((), dtype=dout.dtype, device=dout.device), None, None, None


class LockstepNanoExchange:
    """The ping-pong exchange of this rank's current forward job, in the three phases that
    :func:`distca.model.staggered.staggered_layers` drives per layer: :meth:`send` each
    nano-batch, :meth:`serve` the round, :meth:`land` each nano-batch's merged result.

    ``rows[i]`` (n_i,) int64: local token rows of nano-batch ``i``; ``order`` (T,) int64: each
    token's place in ``cat(rows)``.
    """

    def __init__(self, exchange: LockstepExchange, softmax_scale: float) -> None:
        if exchange.nanos != 2:
            raise RuntimeError("the lock-step exchange runs without nano-batches "
                               "(cad.ping_pong=false)")
        self.exchange = exchange
        self.job = _forward_job(exchange, softmax_scale)
        self.rows, self.order = exchange.rows[self.job]
        self.pending: list[tuple[torch.Tensor, _Ticket] | None] = [None, None]

    def send(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Post nano-batch ``i``'s q (n_i, hq, d) and k/v (its kv rows, hkv, d)."""
        ticket = _Ticket(self.exchange, self.job, i)
        self.pending[i] = (_SendNano.apply(q, k, v, ticket), ticket)

    def serve(self) -> None:
        self.exchange.serve_round()

    def land(self, i: int, num_rows: int, hq: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Nano-batch ``i``'s merged (out (num_rows, hq, d) fp32, lse (num_rows, hq) fp32)."""
        token, ticket = self.pending[i]
        self.pending[i] = None
        out_r, lse_r = _ReceiveNano.apply(token, ticket, hq, d)
        return _merge(out_r, lse_r, self.exchange.layouts[self.job][i].send_q, num_rows)
