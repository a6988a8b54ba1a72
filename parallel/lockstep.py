"""One attention exchange across all pipeline stages per (tick, layer slot) (design §5).

Under the lock-step schedule of :func:`distca.parallel.pipeline.run_lockstep` every stage, in
every tick, runs the forward of one micro-batch, the backward of one, or nothing (a bubble). A
*job* is (stage, micro-batch): the stage's layers over that micro-batch's tokens, held by the
stage's ``dp`` workers. In *round* ``c`` of a tick (one per layer slot, ``L/pp`` rounds), every
rank of the exchange group (all ranks of one tensor rank: ``dp * pp`` of them) joins two
all-to-alls:

* to servers: a forward job's workers send q, k, v of its layer ``c``; a backward job's workers
  send dO and dlse of its layer ``L/pp - 1 - c`` (autograd runs layers in reverse); bubble
  ranks send nothing;
* back to workers: servers return out + lse of the forward tasks, dq/dk/dv of the backward ones.

Every rank is a server in every round, bubble ranks included. A forward tick's jobs are planned
together over all ``dp * pp`` ranks (one plan per tick, workers first; or, with
``cad.pipeline_plan=job``, one plan per job); a job's backward goes to the servers that ran its
forward, which kept the inputs and the kernel's graph per (job, layer). A tick plan balances the
tick's forward tasks only: in a tick that also runs backwards, their (fixed) server load is not
counted, so such a tick can be less balanced than its plan says; per-job plans balance every
job alone, so every tick is a sum of balanced loads. Worker and server gradients are explicit (autograd nodes of
:mod:`distca.parallel.lockstep_worker` on the worker, saved graphs on the server), not one
autograd node spanning the collective: the jobs merged into one forward exchange run their
backwards in different ticks.

With ping-pong (``nano_batches=2``) each job's tokens are two causally closed nano-batches
(:mod:`distca.parallel.nanobatch`, split at the job's document cuts) and a round is two
*sub-rounds*, each an asynchronous all-to-all to the servers and one back. Every rank posts, per
round: to-servers 0, to-servers 1, then serves each in turn and posts its return (back 0, back
1). A forward job sends its first nano-batch in sub-round 0 and runs the second one's linear
layers while it travels (:mod:`distca.model.staggered`); a backward job sends its second
nano-batch's dO first, because autograd reaches it first, and runs the first one's o_proj/MLP
backward meanwhile. Server graphs are kept per (job, layer, nano-batch).

All buffers travel in fp32 (one dtype per all-to-all; forward and backward payloads mix).
Group rank ``s * dp + d`` is worker ``d`` of stage ``s`` (megatron's ``tp-cp-ep-dp-pp`` order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from distca.parallel.alltoall import launch_all_to_all, wait_all_to_all
from distca.parallel.dispatch import AttendFn
from distca.parallel.layout import ServerInputs, server_inputs_from_tasks, server_tasks
from distca.parallel.nanobatch import nano_rows, split_servers_at_cuts
from distca.scheduler import DocumentBatch, documents_from_batch, task_pairs
from distca.scheduler.pipeline_sim import BACKWARD, FORWARD, Pass, TickRow

Job = tuple[int, int]  # (pipeline stage, micro-batch)


@dataclass
class TickDocuments:
    """The documents of one forward tick's jobs laid back to back (stage order).

    Job ``j`` occupies tokens ``[offsets[j], offsets[j] + dp*T)`` of the tick's stream; its
    trailing padding becomes one-token documents (cheap to plan, their tasks are dropped), so the
    stream satisfies the planner's back-to-back documents.
    """

    documents: DocumentBatch
    offsets: list[int]
    real_tokens: list[int]  # document tokens of each job (the rest is padding)


def tick_documents(docs: Sequence[DocumentBatch], tokens_per_job: int) -> TickDocuments:
    """``docs``: per job the documents of its micro-batch."""
    lengths, turns, context, offsets, real = [], [], [], [], []
    for j, batch in enumerate(docs):
        n = batch.num_tokens
        offsets.append(j * tokens_per_job)
        real.append(n)
        pad = np.ones(tokens_per_job - n if j < len(docs) - 1 else 0, dtype=np.int64)
        # a document without turns is one causal turn: DocumentBatch stores it as such
        lengths += [batch.doc_length, pad]
        turns += [batch.turn_length, pad]
        context += [batch.turn_is_context, np.zeros(pad.size, dtype=bool)]
    return TickDocuments(documents_from_batch(np.concatenate(lengths), np.concatenate(turns),
                                              np.concatenate(context)), offsets, real)


def split_placement(servers: list[ServerInputs], tick: TickDocuments, active_ranks: list[int],
                    group_size: int) -> list[list[ServerInputs]]:
    """Per job of the tick, its tasks per exchange-group rank in job-local token coordinates.

    ``servers`` is the tick plan over ``group_size`` servers: server ``i < len(active_ranks)`` is
    the worker on group rank ``active_ranks[i]``; the others are the remaining ranks in order.
    """
    idle = [g for g in range(group_size) if g not in set(active_ranks)]
    rank_of = list(active_ranks) + idle
    jobs: list[list[ServerInputs | None]] = [[None] * group_size for _ in tick.offsets]
    for i, inputs in enumerate(servers):
        q_start, q_end, kv_start, kv_end, causal = server_tasks(inputs)
        for j, (lo, n) in enumerate(zip(tick.offsets, tick.real_tokens)):
            m = (q_start >= lo) & (q_start < lo + n)  # tasks never cross documents
            jobs[j][rank_of[i]] = server_inputs_from_tasks(q_start[m] - lo, q_end[m] - lo,
                                                           kv_start[m] - lo, kv_end[m] - lo,
                                                           causal[m])
    return jobs


@dataclass
class JobLayout:
    """One job's exchange seen from one rank. Index tensors are int64 on the exchange device."""

    workers: list[int]  # group ranks holding the job's tokens (ascending = token order)
    send_q: list[torch.Tensor]  # worker side, per group rank: local query rows sent there
    send_kv: list[torch.Tensor]  # worker side, per group rank: local kv rows sent there
    recv_q: list[int]  # server side, per worker of the job: query rows received from it
    recv_kv: list[int]  # server side, per worker of the job: kv rows received from it
    tasks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # q/kv ranges, causal
    pairs: int  # score pairs this rank serves for the job (per layer, forward)


def job_layout(placement: list[ServerInputs], workers: list[int], tokens_per_worker: int,
               me: int, device: torch.device) -> JobLayout:
    T = tokens_per_worker
    send_q, send_kv = [], []
    if me in workers:
        lo = workers.index(me) * T

        def local(ids) -> torch.Tensor:
            ids = np.asarray(ids, dtype=np.int64)
            a, b = np.searchsorted(ids, [lo, lo + T])
            return torch.as_tensor(ids[a:b] - lo, device=device)

        send_q = [local(p[0]) for p in placement]
        send_kv = [local(p[1]) for p in placement]
    q_tokens, kv_tokens, q_ranges, kv_ranges, causal = placement[me]
    bounds = np.arange(len(workers) + 1) * T
    recv_q = np.diff(np.searchsorted(q_tokens, bounds)).tolist()
    recv_kv = np.diff(np.searchsorted(kv_tokens, bounds)).tolist()
    causal = np.asarray(causal, dtype=bool)
    tasks, pairs = None, 0
    if causal.size:
        q_ranges = np.asarray(q_ranges, dtype=np.int64).reshape(-1, 2)
        kv_ranges = np.asarray(kv_ranges, dtype=np.int64).reshape(-1, 2)
        tasks = (torch.as_tensor(q_ranges, device=device), torch.as_tensor(kv_ranges, device=device),
                 torch.as_tensor(causal, device=device))
        pairs = int(task_pairs(np.diff(q_ranges, axis=1)[:, 0], np.diff(kv_ranges, axis=1)[:, 0],
                               causal).sum())
    return JobLayout(list(workers), send_q, send_kv, recv_q, recv_kv, tasks, pairs)


def nano_job_layouts(placement: list[ServerInputs], cuts: np.ndarray, workers: list[int],
                     tokens_per_worker: int, me: int, device: torch.device
                     ) -> tuple[list[JobLayout], tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One job's two token nano-batch layouts (:mod:`distca.parallel.nanobatch`), this rank's
    local rows of each nano-batch ((n_i,) int64; empty off the job's workers) and ``order``
    ((T,) int64: each local token's place in the rows' concatenation).

    ``cuts`` (dp*T,) int64: the job's :func:`~distca.parallel.nanobatch.document_cuts`. As in
    :func:`~distca.parallel.nanobatch.nano_batches`, layout 0 indexes the first nano-batch's
    rows; layout 1 indexes q rows within the second and kv rows within the concatenation
    (first rows, then second rows): its tasks also read the first nano-batch's kv.
    """
    worker = workers.index(me) if me in workers else None
    rows, order = nano_rows(cuts, worker, tokens_per_worker)
    order_t = torch.as_tensor(order, device=device)
    layouts = []
    for i, half in enumerate(split_servers_at_cuts(placement, cuts)):
        lay = job_layout(half, workers, tokens_per_worker, me, device)
        q_base = rows[0].size if i == 1 else 0
        lay.send_q = [order_t.index_select(0, x) - q_base for x in lay.send_q]
        lay.send_kv = [order_t.index_select(0, x) for x in lay.send_kv]
        layouts.append(lay)
    return layouts, tuple(torch.as_tensor(r, device=device) for r in rows), order_t


class LockstepExchange:
    """Every rank's side of the cross-stage exchanges of one pipeline step (module docstring).

    Set as the :class:`~distca.model.runtime.AttentionRuntime` layout: a worker's attention call
    becomes one round (:mod:`distca.parallel.lockstep_worker`). ``heads`` = (hq, hkv, d) per
    tensor rank; ``dtype`` = compute dtype; ``nano_batches`` = 2 runs ping-pong (two sub-rounds
    per round), 1 one blocking exchange per round.
    """

    def __init__(self, group: dist.ProcessGroup, dp: int, layers_per_stage: int,
                 heads: tuple[int, int, int], attend: AttendFn, softmax_scale: float,
                 dtype: torch.dtype, device: torch.device, nano_batches: int = 1) -> None:
        if nano_batches not in (1, 2):
            raise ValueError(f"nano_batches must be 1 or 2, got {nano_batches}")
        self.group, self.dp, self.slots = group, dp, layers_per_stage
        self.me, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.heads, self.attend, self.softmax_scale = heads, attend, softmax_scale
        self.dtype, self.device, self.nanos = dtype, device, nano_batches
        self.placements: dict[Job, list[ServerInputs]] = {}
        self.cuts: dict[Job, np.ndarray] = {}
        self.tokens_per_worker = 0
        self.training = True
        self.layouts: dict[Job, list[JobLayout]] = {}  # per job: one layout per nano-batch
        # per job: nano rows and their order (see nano_job_layouts)
        self.rows: dict[Job, tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]] = {}
        self.saved: dict[tuple, tuple] = {}  # server graphs awaiting their backward
        self.roles: list[tuple[Pass, Job] | None] = [None] * self.size
        self.row: TickRow = ()
        self.round = 0
        self.inbound: list[tuple] = []  # this round's launched to-server sub-rounds
        self.returns: dict[tuple[int, int], tuple] = {}  # (round, sub-round) -> return in flight
        # Score pairs served (forward + backward, all layers) in ticks where this rank's own
        # stage had no micro-batch: the attention the pipeline bubble would otherwise waste.
        self.bubble_pairs = 0

    def start_step(self, placements: dict[Job, list[ServerInputs]], tokens_per_worker: int,
                   training: bool, cuts: dict[Job, np.ndarray] | None = None) -> None:
        """``placements``: every job's tasks per group rank; ``cuts``: every job's document
        cuts (ping-pong only, see :func:`nano_job_layouts`)."""
        if (cuts is None) != (self.nanos == 1):
            raise ValueError(f"document cuts are needed exactly with ping-pong "
                             f"(nano_batches={self.nanos})")
        self.placements, self.tokens_per_worker, self.training = placements, tokens_per_worker, training
        self.cuts = cuts or {}
        self.layouts, self.rows, self.saved, self.bubble_pairs = {}, {}, {}, 0

    def workers(self, stage: int) -> list[int]:
        return [stage * self.dp + d for d in range(self.dp)]

    def nano_of(self, kind: Pass, sub: int) -> int:
        """The nano-batch a job sends in sub-round ``sub``: a forward sends its first one first;
        a backward its second (autograd reaches the second nano-batch's results first)."""
        return sub if kind is FORWARD else self.nanos - 1 - sub

    # ---- the tick protocol of run_lockstep ---------------------------------------------------
    def begin_tick(self, row: TickRow) -> None:
        self.row, self.round = row, 0
        self.roles = [None] * self.size
        for s, op in enumerate(row):
            if op is None:
                continue
            job = (s, op.micro_batch)
            if op.kind is FORWARD:
                placement, workers = self.placements.pop(job), self.workers(s)
                if self.nanos == 1:
                    self.layouts[job] = [job_layout(placement, workers, self.tokens_per_worker,
                                                    self.me, self.device)]
                else:
                    layouts, rows, order = nano_job_layouts(
                        placement, self.cuts.pop(job), workers, self.tokens_per_worker, self.me,
                        self.device)
                    self.layouts[job], self.rows[job] = layouts, (rows, order)
            for g in self.workers(s):
                self.roles[g] = (op.kind, job)

    def serve_idle(self) -> None:
        """A bubble rank's part of the tick: serve every round with nothing of its own."""
        empty = [torch.zeros(0, dtype=torch.float32, device=self.device)] * self.size
        for _ in range(self.slots):
            for sub in range(self.nanos):
                self.launch(sub, empty)
            self.serve_round()
            for sub in range(self.nanos):
                self.collect(self.round - 1, sub)

    def end_tick(self) -> None:
        if self.round != self.slots or self.inbound or self.returns:
            raise RuntimeError(f"rank {self.me} joined {self.round} attention rounds in a tick "
                               f"with {self.slots} layers per stage ({len(self.inbound)} "
                               f"sub-rounds unserved, {len(self.returns)} returns uncollected)")
        for s, op in enumerate(self.row):
            if op is not None and (op.kind is BACKWARD or not self.training):
                del self.layouts[(s, op.micro_batch)]
                self.rows.pop((s, op.micro_batch), None)

    # ---- one round: sub-rounds out, serve, sub-rounds back -----------------------------------
    def exchange_round(self, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        """One blocking round (``nano_batches=1``): send ``chunks[g]`` (fp32, flat) to each group
        rank as a worker, serve, and return what each group rank sent back to this rank."""
        self.launch(0, chunks)
        self.serve_round()
        return self.collect(self.round - 1, 0)

    def launch(self, sub: int, chunks: list[torch.Tensor]) -> None:
        """Post sub-round ``sub`` of this round's all-to-all to the servers: ``chunks[g]`` (fp32,
        flat) goes to group rank ``g``. Every rank posts sub-rounds 0, 1, ... in order."""
        if sub != len(self.inbound):
            raise RuntimeError(f"rank {self.me} posts sub-round {sub} of round {self.round} "
                               f"after {len(self.inbound)} (every rank must post them in order)")
        hq, hkv, d = self.heads
        counts = []
        for g, role in enumerate(self.roles):
            if role is None:
                counts.append(0)
                continue
            kind, job = role
            lay = self.layouts[job][self.nano_of(kind, sub)]
            w = lay.workers.index(g)
            width = hq * d * lay.recv_q[w]
            counts.append(width + 2 * hkv * d * lay.recv_kv[w] if kind is FORWARD
                          else width + hq * lay.recv_q[w])
        self.inbound.append(self._start(chunks, counts))

    def serve_round(self) -> None:
        """After every sub-round is posted: per sub-round, wait for it, serve it and post its
        return (so a sub-round's return travels while the next one is served)."""
        if len(self.inbound) != self.nanos:
            raise RuntimeError(f"rank {self.me} serves round {self.round} with "
                               f"{len(self.inbound)} of {self.nanos} sub-rounds posted")
        hq, hkv, d = self.heads
        mine = self.roles[self.me]
        for sub, (buffer, work, counts) in enumerate(self.inbound):
            wait_all_to_all(work)
            replies = self._serve(sub, list(torch.split(buffer, counts)))
            back = [0] * self.size
            if mine is not None:
                lay = self.layouts[mine[1]][self.nano_of(mine[0], sub)]
                for g in range(self.size):
                    nq, nkv = lay.send_q[g].numel(), lay.send_kv[g].numel()
                    back[g] = (nq * hq * (d + 1) if mine[0] is FORWARD
                               else nq * hq * d + 2 * nkv * hkv * d)
            self.returns[(self.round, sub)] = self._start(replies, back)
        self.inbound = []
        self.round += 1

    def collect(self, round_: int, sub: int) -> list[torch.Tensor]:
        """Wait for sub-round ``sub`` of round ``round_`` to come back: per group rank, what it
        returned to this rank as a worker (fp32, flat)."""
        buffer, work, counts = self.returns.pop((round_, sub))
        wait_all_to_all(work)
        return list(torch.split(buffer, counts))

    def _start(self, chunks: list[torch.Tensor], recv_counts: list[int]) -> tuple:
        send = torch.cat([c.reshape(-1).float() for c in chunks])
        out, work = launch_all_to_all(send, [c.numel() for c in chunks], recv_counts, self.group,
                                      async_op=True)
        return out, work, recv_counts

    def _serve(self, sub: int, received: list[torch.Tensor]) -> list[torch.Tensor]:
        """Server side of one sub-round: per-destination fp32 replies."""
        hq, hkv, d = self.heads
        replies = [received[0].new_zeros(0)] * self.size
        jobs = {role[1]: role[0] for role in self.roles if role is not None}
        idle = self.roles[self.me] is None
        for job, kind in jobs.items():
            nano = self.nano_of(kind, sub)
            lay = self.layouts[job][nano]
            if lay.tasks is None:
                continue
            if idle:
                self.bubble_pairs += lay.pairs
            parts = [received[g] for g in lay.workers]
            if kind is FORWARD:
                q, k, v = _split_rows(parts, lay.recv_q, lay.recv_kv, (hq, hkv, hkv), d)
                q, k, v = (t.to(self.dtype) for t in (q, k, v))
                out, lse = self._forward_tasks((job, self.round, nano), q, k, v, lay)
                rows = [torch.cat([o.reshape(-1).float(), s.reshape(-1)])
                        for o, s in zip(out.split(lay.recv_q), lse.float().split(lay.recv_q))]
            else:
                dout = torch.cat([p[:n * hq * d] for p, n in zip(parts, lay.recv_q)]).view(-1, hq, d)
                dlse = torch.cat([p[n * hq * d:] for p, n in zip(parts, lay.recv_q)]).view(-1, hq)
                key = (job, self.slots - 1 - self.round, nano)
                dq, dk, dv = self._backward_tasks(key, dout, dlse)
                rows = [torch.cat([a.reshape(-1), b.reshape(-1), c.reshape(-1)]).float()
                        for a, b, c in zip(dq.split(lay.recv_q), dk.split(lay.recv_kv),
                                           dv.split(lay.recv_kv))]
            for g, row in zip(lay.workers, rows):
                replies[g] = row
        return replies

    def _forward_tasks(self, key, q, k, v, lay: JobLayout):
        if not self.training:
            return self.attend(q, k, v, *lay.tasks)
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        with torch.enable_grad():
            out, lse = self.attend(*inputs, *lay.tasks)
        self.saved[key] = (inputs, (out, lse))
        return out.detach(), lse.detach()

    def _backward_tasks(self, key, dout, dlse):
        inputs, outputs = self.saved.pop(key)
        return torch.autograd.grad(outputs, inputs, (dout.to(outputs[0].dtype), dlse))


def _split_rows(parts: list[torch.Tensor], recv_q: list[int], recv_kv: list[int],
                heads: tuple[int, int, int], d: int) -> tuple[torch.Tensor, ...]:
    """Concatenate each worker's q, k, v rows (worker order = token order) into server buffers."""
    hq, hk, hv = heads
    qs, ks, vs = [], [], []
    for p, nq, nkv in zip(parts, recv_q, recv_kv):
        q, k, v = torch.split(p, [nq * hq * d, nkv * hk * d, nkv * hv * d])
        qs.append(q)
        ks.append(k)
        vs.append(v)
    return (torch.cat(qs).view(-1, hq, d), torch.cat(ks).view(-1, hk, d),
            torch.cat(vs).view(-1, hv, d))
