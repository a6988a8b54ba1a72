"""Dispatch q/k/v of CA-tasks to attention servers and bring out + lse back (design §5).

One exchange, seen from a rank that is both worker and server (in place) or only one of them::

    worker:  q, k, v (N, H, D) --gather by layout--> flat --all_to_all--> server buffers
    server:  core attention over its tasks          --> out, lse (no sink)
    worker:  flat <--all_to_all-- per-row partials --merge by LSE--> out (N, Hq, D), lse (N, Hq)

All steps are differentiable: the backward sends dO (and dlse) to the servers and dq/dk/dv back;
index gathers sum the gradients of kv rows sent to several servers. ``parallel`` never imports
``distca``: the attention kernel is passed in as ``attend``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from distca.parallel.alltoall import all_to_all
from distca.parallel.layout import DispatchLayout

# attend(q, k, v, q_ranges, kv_ranges, causal) -> (out (Nq, Hq, D), lse (Nq, Hq) fp32), no sink
AttendFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             layout: DispatchLayout) -> torch.Tensor:
    """Flat send buffer of this worker: per server (group-rank order) its q rows, k rows, v rows."""
    pieces = []
    for s in layout.servers_by_rank():
        qi, kvi = layout.send_q_idx[s], layout.send_kv_idx[s]
        pieces += [q.index_select(0, qi).reshape(-1), k.index_select(0, kvi).reshape(-1),
                   v.index_select(0, kvi).reshape(-1)]
    if not pieces:
        return q.new_zeros(0)
    return torch.cat(pieces)


def unpack_qkv(flat: torch.Tensor, layout: DispatchLayout, hq: int, hkv: int, d: int):
    """Server buffers (Nq, hq, d), (Nkv, hkv, d), (Nkv, hkv, d) from the received flat buffer."""
    sizes = []
    for nq, nkv in zip(layout.recv_q_counts, layout.recv_kv_counts):
        sizes += [nq * hq * d, nkv * hkv * d, nkv * hkv * d]
    parts = torch.split(flat, sizes)
    q = torch.cat(parts[0::3]).view(-1, hq, d)
    k = torch.cat(parts[1::3]).view(-1, hkv, d)
    v = torch.cat(parts[2::3]).view(-1, hkv, d)
    return q, k, v


def serve(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: DispatchLayout,
          attend: AttendFn) -> tuple[torch.Tensor, torch.Tensor]:
    """Run this server's tasks; (out (Nq, hq, d), lse (Nq, hq) fp32). Empty when it serves nothing.

    Empty results stay attached to ``q``'s graph: every rank must then join the backward
    exchanges, which autograd only runs for outputs that require grad.
    """
    if layout.q_ranges is None or q.shape[0] == 0:
        return q * 0, q.float()[..., 0] * 0
    return attend(q, k, v, layout.q_ranges, layout.kv_ranges, layout.causal)


def pack_results(out: torch.Tensor, lse: torch.Tensor, layout: DispatchLayout) -> torch.Tensor:
    """Flat return buffer of a server: per source worker its out rows then its lse rows.

    lse travels in the dtype of ``out``; :func:`dispatch_attention` keeps fp32 for both.
    """
    counts = layout.recv_q_counts
    outs = torch.split(out, counts)
    lses = torch.split(lse.to(out.dtype), counts)
    pieces = [t.reshape(-1) for pair in zip(outs, lses) for t in pair]
    return torch.cat(pieces) if pieces else out.new_zeros(0)


def unpack_results(flat: torch.Tensor, layout: DispatchLayout, hq: int, d: int):
    """Per-row partial (out (R, hq, d), lse (R, hq)) in ``layout.merge_index`` order."""
    sizes = []
    for s in layout.servers_by_rank():
        n = layout.send_q_idx[s].numel()
        sizes += [n * hq * d, n * hq]
    parts = torch.split(flat, sizes)
    out = torch.cat(parts[0::2]).view(-1, hq, d) if parts else flat.new_zeros(0, hq, d)
    lse = torch.cat(parts[1::2]).view(-1, hq) if parts else flat.new_zeros(0, hq)
    return out, lse


def merge_partials(out_r: torch.Tensor, lse_r: torch.Tensor, index: torch.Tensor,
                   num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial rows by LSE into (out (N, hq, d), lse (N, hq)); rows with no partial get
    out = 0 and lse = -inf. ``L = logsumexp_r L_r``, ``O = sum_r exp(L_r - L) O_r``."""
    n, hq, d = num_tokens, out_r.shape[1], out_r.shape[2]
    lse_r = lse_r.float()
    peak = torch.full((n, hq), float("-inf"), dtype=torch.float32, device=out_r.device)
    peak = peak.scatter_reduce(0, index[:, None].expand_as(lse_r), lse_r.detach(), "amax")
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    weight = torch.exp(lse_r - peak.index_select(0, index))
    total = torch.zeros_like(peak).index_add(0, index, weight)
    lse = peak + torch.log(total)
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    out = out_r.new_zeros(n, hq, d).index_add(0, index, (weight / safe_total.index_select(0, index))
                                              .unsqueeze(-1).to(out_r.dtype) * out_r)
    return out, lse


def dispatch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: DispatchLayout,
                       attend: AttendFn, group: dist.ProcessGroup | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Core attention of this worker's tokens through the servers of ``layout`` (blocking).

    q (N, hq, d), k and v (N, hkv, d) are this rank's tokens (N = 0 on server-only ranks).
    Returns the merged (out (N, hq, d), lse (N, hq) fp32) without any sink.
    """
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    send = pack_qkv(q, k, v, layout)
    recv = all_to_all(send, layout.send_counts_by_rank(hq * d, hkv * d),
                      layout.recv_counts_by_rank(hq * d, hkv * d), group)
    sq, sk, sv = unpack_qkv(recv, layout, hq, hkv, d)
    out_s, lse_s = serve(sq, sk, sv, layout, attend)
    back = pack_results(out_s.float(), lse_s, layout)
    got = all_to_all(back, [n * hq * (d + 1) for n in layout.recv_q_counts],
                     layout.return_counts_by_rank(hq * (d + 1)), group)
    out_r, lse_r = unpack_results(got, layout, hq, d)
    out, lse = merge_partials(out_r, lse_r, layout.merge_index, q.shape[0])
    return out.to(q.dtype), lse
