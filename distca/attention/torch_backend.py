"""Reference backend: one aten flash-attention call per task, merged by LSE in Python.

Runs on the aten CPU flash kernel (``_scaled_dot_product_flash_attention_for_cpu`` and its
backward), which tiles internally, so memory stays O(tokens); the per-task Python loop is what
the ``cpp`` backend removes. Every backend module provides the same two primitives:

``forward(q, k, v, tasks, scale) -> (out, lse)``
    ``q`` (Nq, Hq, D), ``k``/``v`` (Nk, Hkv, D); ``out`` (Nq, Hq, D) in ``q.dtype`` and ``lse``
    (Nq, Hq) float32 (float64 for float64 inputs), merged over all tasks of each row; rows in no task get 0 and -inf.
``backward(dout, q, k, v, out, lse, tasks, scale, dlse=None) -> (dq, dk, dv)``
    gradients for ``dS = P * (dP - delta)`` with ``delta = rowsum(dout * out) - dlse``, where
    ``lse`` is the merged one (the ring-attention identity, design §2): ``out`` only enters
    through ``delta``, which lets the caller fold the sink into it.
"""

from __future__ import annotations

import torch

from .merge import NEG_INF, accum_dtype, merge_into_
from .tasks import TaskList, split_causal

_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


DEVICES = ("cpu",)


def is_available() -> bool:
    return True


def unavailable_reason() -> str:
    return ""


def _heads_first(x: torch.Tensor, lo: int, hi: int, repeat: int = 1) -> torch.Tensor:
    """(N, H, D)[lo:hi] -> (1, H * repeat, hi - lo, D), repeating heads for GQA."""
    t = x[lo:hi].transpose(0, 1)
    if repeat > 1:
        t = t.repeat_interleave(repeat, dim=0)
    return t.unsqueeze(0)


def _tokens_first(x: torch.Tensor) -> torch.Tensor:
    """(1, H, L, ...) -> (L, H, ...)."""
    return x.squeeze(0).transpose(0, 1)


def _group_sum(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(L, Hq, D) -> (L, Hkv, D): sum the gradients of the query heads sharing one kv head."""
    if groups == 1:
        return x
    n, h, d = x.shape
    return x.reshape(n, h // groups, groups, d).sum(2)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tasks: TaskList,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    groups = q.shape[1] // k.shape[1]
    acc = accum_dtype(q.dtype)
    acc_out = torch.zeros(q.shape, dtype=acc, device=q.device)
    acc_lse = torch.full(q.shape[:2], NEG_INF, dtype=acc, device=q.device)
    for row in tasks.rows:
        for a, b, c, d, causal in split_causal(row):
            out, lse = _fwd(_heads_first(q, a, b), _heads_first(k, c, d, groups),
                            _heads_first(v, c, d, groups), 0.0, causal, scale=scale)
            merge_into_(acc_out[a:b], acc_lse[a:b], _tokens_first(out), _tokens_first(lse))
    return acc_out.to(q.dtype), acc_lse


def _task_grads(dout, q, k, v, out, lse, tasks, scale, dq, dk, dv) -> None:
    """Accumulate (float32, in place) every task's gradients for the given dout/out."""
    groups = q.shape[1] // k.shape[1]
    lse = lse.to(accum_dtype(q.dtype))
    for row in tasks.rows:
        for a, b, c, d, causal in split_causal(row):
            gq, gk, gv = _bwd(
                _heads_first(dout, a, b), _heads_first(q, a, b),
                _heads_first(k, c, d, groups), _heads_first(v, c, d, groups),
                _heads_first(out, a, b), lse[a:b].t().unsqueeze(0), 0.0, causal, scale=scale,
            )
            dq[a:b] += _tokens_first(gq)
            dk[c:d] += _group_sum(_tokens_first(gk), groups)
            if dv is not None:
                dv[c:d] += _group_sum(_tokens_first(gv), groups)


def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             out: torch.Tensor, lse: torch.Tensor, tasks: TaskList, scale: float,
             dlse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    f32 = dict(dtype=accum_dtype(q.dtype), device=q.device)
    dq, dk, dv = torch.zeros(q.shape, **f32), torch.zeros(k.shape, **f32), torch.zeros(v.shape, **f32)
    _task_grads(dout, q, k, v, out, lse, tasks, scale, dq, dk, dv)
    if dlse is not None:
        # The aten kernel computes delta from (dout, out) itself. An extra pass with v = 0 has
        # dP = 0, and dout = 1, out = -dlse / D make its delta -dlse, so it adds exactly the
        # lse-gradient term P * dlse to dS.
        ones = torch.ones_like(dout)
        shifted = (-dlse / q.shape[-1]).unsqueeze(-1).expand(dout.shape).to(dout.dtype).contiguous()
        _task_grads(ones, q, k, torch.zeros_like(v), shifted, lse, tasks, scale, dq, dk, None)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
