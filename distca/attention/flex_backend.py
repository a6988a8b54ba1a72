"""GPU backend on PyTorch flex_attention (used where flash-attn is absent).

The whole task list is one flex call. Its block mask is built from the tasks themselves,
never from an S×S grid: one byte per (128-query, 128-key) block says empty, partial (the
``mask_mod`` decides per pair) or full (no per-pair check), plus (rows, M) int32 slot tables
that the ``mask_mod`` reads (row ``i``'s ``m``-th task lets it see keys
``[start[i, m], end[i, m])``, the causal limit folded into ``end``), so flex returns the
merged ``(O, L)`` directly.

Token counts are padded to buckets (at most 1/8 extra rows, multiples of 128) before the
compiled graph, whose shapes are static: the kernel is then reused across steps whose token
counts differ slightly (the graph never sees the unpadded count); padded rows are in no task.
Each bucket pair is one compiled kernel; torch's default of 8 recompiles per function would
then silently fall back to eager flex (an S×S score matrix) after 8 shapes, so calls run with
a limit of :data:`SHAPE_LIMIT` instead.
flex has no standalone backward: :func:`forward_with_graph` runs kernel and sink as one
compiled graph and keeps its autograd graph for :func:`backward_from_graph` (the path
``core_attention`` takes); :func:`backward` (the runtime's split forward/backward) recomputes
this server's forward and feeds its graph gradients chosen so that ``dS = P (dP - delta)``
with the merged rows' ``delta`` (the ring-attention identity, design §2). Primitives as in
:mod:`distca.attention.torch_backend`.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from .gpu_probe import fused_on_cuda, host_to_device, missing_reason
from .merge import NEG_INF, apply_sink
from .tasks import TaskList

DEVICES = ("cuda",)
BLOCK = 128
# Compiled shapes per process: ~8 buckets per doubling of the token count, for q and kv, with
# and without sinks. torch caps all compiled functions of a process together at
# torch._dynamo.config.accumulated_recompile_limit (256 by default), so more would not count.
SHAPE_LIMIT = 256

Graph = tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]


def is_available() -> bool:
    return unavailable_reason() is None


def unavailable_reason() -> str | None:
    return missing_reason("torch.nn.attention.flex_attention", "this torch has no torch.nn.attention.flex_attention")


def padded_length(n: int) -> int:
    """``n`` rounded up to a multiple of ``max(128, 2**ceil(log2 n) / 8)``."""
    step = max(BLOCK, (1 << max(n - 1, 0).bit_length()) // 8)
    return max(step, -(-n // step) * step)


def _causal_end(row: tuple[int, int, int, int, bool], r: np.ndarray) -> np.ndarray:
    """Exclusive key end seen by query rows ``r`` of a task (bottom-right causal)."""
    a, b, c, d, causal = row
    return np.minimum(d, d - b + 1 + r) if causal else np.full_like(r, d)


def _slot_tables(tasks: TaskList, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, M) int32 ``start`` and ``end`` of the keys each row sees in its m-th task."""
    count = np.zeros(rows, dtype=np.int64)
    entries = []
    for task in tasks.rows:
        a, b, c, d, _ = task
        if b <= a or d <= c:
            continue
        r = np.arange(a, b)
        entries.append((r, count[a:b].copy(), c, _causal_end(task, r)))
        count[a:b] += 1
    width = max(int(count.max()) if rows else 0, 1)
    start = np.zeros((rows, width), dtype=np.int32)
    end = np.zeros((rows, width), dtype=np.int32)
    for r, slot, c, e in entries:
        start[r, slot] = c
        end[r, slot] = e
    return torch.from_numpy(start), torch.from_numpy(end)


def block_grid(tasks: TaskList, q_blocks: int, kv_blocks: int) -> np.ndarray:
    """(q_blocks, kv_blocks) int8: 0 no pair visible, 1 some pairs, 2 every pair visible.

    "Full" is claimed only where one task owns all 128 rows of the query block and every row
    sees the whole key block; anything else visible is partial (exact per pair via mask_mod).
    """
    grid = np.zeros((q_blocks, kv_blocks), dtype=np.int8)
    for task in tasks.rows:
        a, b, c, d, _ = task
        if b <= a or d <= c:
            continue
        for qb in range(a // BLOCK, (b - 1) // BLOCK + 1):
            r0, r1 = max(a, qb * BLOCK), min(b, (qb + 1) * BLOCK)
            first_end, last_end = _causal_end(task, np.array([r0, r1 - 1]))
            if last_end <= c:
                continue
            row = grid[qb]
            np.maximum(row[c // BLOCK:(last_end - 1) // BLOCK + 1], 1,
                       out=row[c // BLOCK:(last_end - 1) // BLOCK + 1])
            if r1 - r0 == BLOCK:
                lo, hi = -(-c // BLOCK), first_end // BLOCK
                row[lo:max(lo, hi)] = 2
    return grid


def _blocks_of(kind: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 1, Q) counts and (1, 1, Q, KV) indices (the listed blocks first) of a bool grid."""
    count = kind.sum(-1, dtype=np.int32)
    index = np.argsort(~kind, axis=-1, kind="stable").astype(np.int32)
    return torch.from_numpy(count)[None, None], torch.from_numpy(index)[None, None]


def _build_block_mask(tasks: TaskList, device: torch.device):
    from torch.nn.attention.flex_attention import BlockMask

    rows, cols = padded_length(tasks.num_q), padded_length(tasks.num_kv)
    start, end = (host_to_device(t, device) for t in _slot_tables(tasks, rows))

    def visible(b, h, q_idx, kv_idx):
        ok = (kv_idx >= start[q_idx, 0]) & (kv_idx < end[q_idx, 0])
        for m in range(1, start.shape[1]):
            ok = ok | ((kv_idx >= start[q_idx, m]) & (kv_idx < end[q_idx, m]))
        return ok

    grid = block_grid(tasks, rows // BLOCK, cols // BLOCK)
    partial = [host_to_device(t, device) for t in _blocks_of(grid == 1)]
    full = [host_to_device(t, device) for t in _blocks_of(grid == 2)]
    return BlockMask.from_kv_blocks(*partial, *full, BLOCK_SIZE=BLOCK, mask_mod=visible,
                                    seq_lengths=(rows, cols))


def _block_mask(tasks: TaskList, device: torch.device):
    return tasks.derived(f"flex_block_mask:{device}", lambda: _build_block_mask(tasks, device))


def _padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    """(N, H, D) -> (rows, H, D), zero rows appended (they are in no task)."""
    if rows == x.shape[0]:
        return x
    return torch.nn.functional.pad(x, (0, 0, 0, 0, 0, rows - x.shape[0]))


def _attention(q, k, v, sinks, block_mask, scale: float):
    """flex plus the optional sink, what :func:`_compiled_attention` compiles.

    ``q`` (rows, Hq, D), ``k``/``v`` (cols, Hkv, D), padded to the block mask's buckets.
    Returns ``out`` (rows, Hq, D) and ``lse`` (rows, Hq) float32.
    """
    from torch.nn.attention import flex_attention as flex

    args = tuple(x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    options = dict(block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    if hasattr(flex, "AuxRequest"):  # torch >= 2.9 deprecates return_lse
        out, aux = flex.flex_attention(*args, **options, return_aux=flex.AuxRequest(lse=True))
        lse = aux.lse
    else:
        out, lse = flex.flex_attention(*args, **options, return_lse=True)
    out, lse = out[0].transpose(0, 1), lse[0].transpose(0, 1).float()
    if sinks is not None:
        out, lse = apply_sink(out, lse, sinks)
    return out.contiguous(), lse.contiguous()


@functools.cache
def _compiled_attention():
    """:func:`_attention` compiled into one graph (one set of guards and launches)."""
    return torch.compile(_attention, dynamic=False)


class _ShapeLimit:
    """Raises dynamo's per-function recompile limit to :data:`SHAPE_LIMIT` for one call.

    A plain attribute write and restore: ``torch._dynamo.config.patch`` costs ~50 us a call on
    a 2.2 GHz core, a quarter of the host time that left small calls behind the plain kernel.
    """

    def __enter__(self):
        self.saved = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(self.saved, SHAPE_LIMIT)

    def __exit__(self, *exc):
        torch._dynamo.config.recompile_limit = self.saved


def _run(q, k, v, sinks, tasks, scale):
    """(N, H, D) tensors -> out (Nq, Hq, D), lse (Nq, Hq) float32, the sink applied if given."""
    rows, cols = padded_length(tasks.num_q), padded_length(tasks.num_kv)
    with _ShapeLimit():
        out, lse = _compiled_attention()(_padded(q, rows), _padded(k, cols), _padded(v, cols),
                                         sinks, _block_mask(tasks, q.device), scale)
    return out[:tasks.num_q], lse[:tasks.num_q]


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tasks: TaskList,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _run(q, k, v, None, tasks, scale)


def forward_with_graph(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       sinks: torch.Tensor | None, tasks: TaskList, scale: float
                       ) -> tuple[torch.Tensor, torch.Tensor, Graph]:
    """The whole forward of ``core_attention`` (kernel and sink) as one compiled graph.

    Returns ``out`` (Nq, Hq, D) and ``lse`` (Nq, Hq) float32 after the sink, and the graph that
    :func:`backward_from_graph` differentiates: flex has no standalone backward, and keeping
    the graph avoids recomputing the forward.
    """
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    if sinks is not None:
        leaves.append(sinks.detach().requires_grad_())
    with torch.enable_grad():
        out, lse = _run(*leaves[:3], leaves[3] if sinks is not None else None, tasks, scale)
    return out.detach(), lse.detach(), (leaves, out, lse)


def backward_from_graph(graph: Graph, d_out: torch.Tensor | None, d_lse: torch.Tensor | None):
    """(dq, dk, dv, dsinks or None) of :func:`forward_with_graph`'s outputs."""
    leaves, out, lse = graph
    if d_lse is not None:
        d_lse = torch.where(lse.detach() == NEG_INF, 0.0, d_lse)
    pairs = [(t, g) for t, g in ((out, d_out), (lse, d_lse)) if g is not None]
    grads = torch.autograd.grad([t for t, _ in pairs], leaves, [g for _, g in pairs],
                                allow_unused=True)
    return (*grads[:3], grads[3] if len(leaves) == 4 else None)


@fused_on_cuda
def _graph_grads(dout, out, lse, dlse, own_out, own_lse):
    """Gradients to feed flex's autograd graph: ((N, H, D) like own_out, (N, H) float32).

    Autograd through flex differentiates this call's softmax P_own = P * exp(L - L_own).
    Scaling dout by c = exp(L_own - L) turns its dS = P_own (dP - rowsum(dout * own_out) +
    g_lse) into P (dP - delta) with delta = rowsum(dout * out) - dlse (the merged row's), for
    g_lse = rowsum(c * dout * own_out) - c * delta; dv = P_own^T (c * dout) = P^T dout.
    """
    live = lse != NEG_INF
    c = torch.where(live, torch.exp(own_lse - torch.where(live, lse, 0.0)), 0.0)
    delta = (dout.float() * out.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse
    scaled = dout.float() * c.unsqueeze(-1)
    g_lse = (scaled * own_out.float()).sum(-1) - c * delta
    return scaled.to(own_out.dtype), g_lse


def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             out: torch.Tensor, lse: torch.Tensor, tasks: TaskList, scale: float,
             dlse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # The runtime's split backward: recompute this server's forward, then feed its graph the
    # gradients of the merged rows.
    _, _, (leaves, own_out, own_lse) = forward_with_graph(q, k, v, None, tasks, scale)
    grads = _graph_grads(dout, out, lse, dlse, own_out.detach(), own_lse.detach())
    return torch.autograd.grad((own_out, own_lse), leaves, grads)
