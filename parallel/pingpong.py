"""Ping-pong dispatch: one layer's attention exchange as two overlapped nano-batches (design §5).

An exchange runs in three phases, each a function here: :func:`send_qkv` launches the q/k/v
all-to-all, :func:`serve_and_return` waits for it, runs this rank's tasks and launches the
return of out + lse, :func:`receive_results` waits for those. Work between two phases overlaps
the exchange in flight. Two users:

* token nano-batches (:mod:`distca.parallel.nanobatch`, driven by
  :mod:`distca.model.staggered`): the phases of one nano-batch interleave with the other's
  linear layers, per layer;
* task nano-batches (:func:`split_nano_batches`: every server's tasks split into two halves of
  near-equal score pairs) in :func:`pingpong_attention`, which overlaps one half's exchange with
  the other half's attention only::

    send q/k/v 0 | send q/k/v 1 | wait 0, serve 0, send out 0 | wait 1, serve 1, send out 1
    | wait out 0 | wait out 1 | merge all partial rows by LSE

Both issue the collectives of a layer in this order, so a dedicated server serves token
nano-batches with :func:`pingpong_attention`. Autograd replays the nodes in reverse creation
order, which gives the mirrored overlap in the backward; every rank builds a graph with the
same exchange order, so the collectives line up everywhere.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from distca.parallel.alltoall import finish_all_to_all, start_all_to_all
from distca.parallel.dispatch import (
    AttendFn,
    merge_partials,
    pack_qkv,
    pack_results,
    serve,
    unpack_qkv,
    unpack_results,
)
from distca.parallel.layout import (
    DispatchLayout,
    ServerInputs,
    server_inputs_from_tasks,
    server_tasks,
)
from distca.scheduler import task_pairs


def split_nano_batches(servers: list[ServerInputs]) -> tuple[list[ServerInputs], list[ServerInputs]]:
    """Split every server's tasks into two nano-batches of near-equal score pairs (greedy, largest
    task first), returned as two lists of per-server inputs in global token coordinates."""
    halves: tuple[list[ServerInputs], list[ServerInputs]] = ([], [])
    for inputs in servers:
        q_start, q_end, kv_start, kv_end, causal = server_tasks(inputs)
        side = np.zeros(q_start.size, dtype=np.int64)
        load = [0, 0]
        pairs = task_pairs(q_end - q_start, kv_end - kv_start, causal)
        for t in np.argsort(-pairs, kind="stable"):
            side[t] = int(load[1] < load[0])
            load[side[t]] += int(pairs[t])
        for half in (0, 1):
            m = side == half
            halves[half].append(server_inputs_from_tasks(q_start[m], q_end[m], kv_start[m],
                                                         kv_end[m], causal[m]))
    return halves


def send_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: DispatchLayout,
             group: dist.ProcessGroup | None = None):
    """Launch the q/k/v exchange of ``layout``: q (Nq, hq, d) rows indexed by
    ``layout.send_q_idx``, k and v (Nkv, hkv, d) by ``send_kv_idx``. Returns the in-flight
    exchange for :func:`serve_and_return`."""
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    return start_all_to_all(pack_qkv(q, k, v, layout), layout.send_counts_by_rank(hq * d, hkv * d),
                            layout.recv_counts_by_rank(hq * d, hkv * d), group)


def serve_and_return(sent, layout: DispatchLayout, attend: AttendFn, shape: tuple[int, int, int],
                     group: dist.ProcessGroup | None = None):
    """Wait for the q/k/v of :func:`send_qkv`, run this rank's tasks and launch the return of
    out + lse; ``shape`` = (hq, hkv, d). Returns the in-flight exchange for
    :func:`receive_results`."""
    hq, hkv, d = shape
    recv = finish_all_to_all(*sent)
    out_s, lse_s = serve(*unpack_qkv(recv, layout, hq, hkv, d), layout, attend)
    back = pack_results(out_s.float(), lse_s, layout)
    return start_all_to_all(back, [n * hq * (d + 1) for n in layout.recv_q_counts],
                            layout.return_counts_by_rank(hq * (d + 1)), group)


def receive_results(returned, layout: DispatchLayout, hq: int, d: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Wait for :func:`serve_and_return`'s results: per-row partials (out (R, hq, d) fp32,
    lse (R, hq)) in ``layout.merge_index`` order."""
    return unpack_results(finish_all_to_all(*returned), layout, hq, d)


def pingpong_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       layouts: tuple[DispatchLayout, DispatchLayout], attend: AttendFn,
                       group: dist.ProcessGroup | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`~distca.parallel.dispatch.dispatch_attention` over two nano-batch layouts.

    q (N, hq, d), k and v (N, hkv, d) are this rank's tokens. Returns the merged (out (N, hq, d),
    lse (N, hq) fp32) without any sink.
    """
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    sent = [send_qkv(q, k, v, lay, group) for lay in layouts]
    returned = [serve_and_return(x, lay, attend, (hq, hkv, d), group)
                for x, lay in zip(sent, layouts)]
    partials = [receive_results(x, lay, hq, d) for x, lay in zip(returned, layouts)]
    out_r = torch.cat([p[0] for p in partials])
    lse_r = torch.cat([p[1] for p in partials])
    index = torch.cat([lay.merge_index for lay in layouts])
    out, lse = merge_partials(out_r, lse_r, index, q.shape[0])
    return out.to(q.dtype), lse
