"""GPU backend on flash-attn's varlen kernels (``pip install flash-attn``; imported lazily).

Causal is per call, so the tasks run as at most two packed batches (causal, full) whose rows
are merged by LSE (:mod:`distca.attention.packing`). The backward calls flash-attn's varlen
backward per batch with the *merged* output and LSE gathered to the batch's rows (the
ring-attention identity, design §2) and scatter-adds the gradients. Primitives as in
:mod:`distca.attention.torch_backend`; fp16/bf16, head dim up to 256.
"""

from __future__ import annotations

import functools
import importlib
import inspect

import torch

from distca.parallel.dispatch import merge_partials

from .gpu_probe import missing_reason
from .merge import NEG_INF
from .packing import VarlenCall, pack_tasks
from .tasks import TaskList

DEVICES = ("cuda",)


@functools.cache
def _interface():
    return importlib.import_module("flash_attn.flash_attn_interface")


def is_available() -> bool:
    return unavailable_reason() is None


def unavailable_reason() -> str | None:
    return missing_reason("flash_attn.flash_attn_interface", "flash-attn is not installed (pip install 'distca[gpu]')")


def _call(fn, **kwargs):
    """Call a flash-attn internal with the keywords its installed version accepts.

    flash-attn renamed some arguments across 2.x releases (``window_size`` became
    ``window_size_left``/``window_size_right``); unknown ones are dropped. From 2.6 the
    internals are ``torch.library.custom_op`` objects whose own signature is
    ``(*args, **kwargs)``: the names come from the function they wrap.
    """
    params = inspect.signature(getattr(fn, "_init_fn", fn)).parameters
    if "window_size" in params:
        kwargs["window_size"] = (-1, -1)
    return fn(**{name: value for name, value in kwargs.items() if name in params})


def _lse_from_flash(lse: torch.Tensor, rows: int) -> torch.Tensor:
    """flash-attn varlen LSE (H, P) with +inf on empty rows -> (P, H) with -inf."""
    lse = lse[:, :rows].transpose(0, 1).float()
    return torch.where(torch.isinf(lse), NEG_INF, lse)


def _batches(tasks: TaskList, device: torch.device) -> list[VarlenCall]:
    return tasks.derived(f"flash_batches:{device}", lambda: pack_tasks(tasks.rows, device))


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tasks: TaskList,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    fa = _interface()
    parts = []
    for batch in _batches(tasks, q.device):
        qp, kp, vp = q[batch.q_index], k[batch.kv_index], v[batch.kv_index]
        result = _call(
            fa._flash_attn_varlen_forward, q=qp, k=kp, v=vp, cu_seqlens_q=batch.cu_q,
            cu_seqlens_k=batch.cu_kv, max_seqlen_q=batch.max_q, max_seqlen_k=batch.max_kv,
            dropout_p=0.0, softmax_scale=scale, causal=batch.causal, window_size_left=-1,
            window_size_right=-1, softcap=0.0, alibi_slopes=None, return_softmax=False)
        # flash-attn <= 2.5 returns (out, q, k, v, out_padded, lse, ...), later (out, lse, ...).
        out, lse = result[0], result[5] if len(result) == 8 else result[1]
        parts.append((batch.q_index, out, _lse_from_flash(lse, qp.shape[0])))
    # partial rows of the calls (a row's causal and full tasks are in different calls), by LSE
    out, lse = merge_partials(torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]),
                              torch.cat([p[0] for p in parts]), q.shape[0])
    return out.to(q.dtype), lse


def _task_grads(dout, q, k, v, out, lse, tasks, scale, dq, dk, dv) -> None:
    fa = _interface()
    for batch in _batches(tasks, q.device):
        qp, kp, vp = q[batch.q_index], k[batch.kv_index], v[batch.kv_index]
        lse_p = lse[batch.q_index].transpose(0, 1).contiguous()
        lse_p = torch.where(lse_p == NEG_INF, float("inf"), lse_p)
        gq, gk, gv = torch.empty_like(qp), torch.empty_like(kp), torch.empty_like(vp)
        _call(fa._flash_attn_varlen_backward, dout=dout[batch.q_index], q=qp, k=kp, v=vp,
              out=out[batch.q_index], softmax_lse=lse_p, dq=gq, dk=gk, dv=gv,
              cu_seqlens_q=batch.cu_q, cu_seqlens_k=batch.cu_kv, max_seqlen_q=batch.max_q,
              max_seqlen_k=batch.max_kv, dropout_p=0.0, softmax_scale=scale,
              causal=batch.causal, window_size_left=-1, window_size_right=-1, softcap=0.0,
              alibi_slopes=None, deterministic=False, rng_state=None)
        dq.index_add_(0, batch.q_index, gq.float())
        dk.index_add_(0, batch.kv_index, gk.float())
        if dv is not None:
            dv.index_add_(0, batch.kv_index, gv.float())


def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             out: torch.Tensor, lse: torch.Tensor, tasks: TaskList, scale: float,
             dlse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    f32 = dict(dtype=torch.float32, device=q.device)
    dq, dk, dv = torch.zeros(q.shape, **f32), torch.zeros(k.shape, **f32), torch.zeros(v.shape, **f32)
    dout, out = dout.contiguous(), out.contiguous()
    _task_grads(dout, q, k, v, out, lse, tasks, scale, dq, dk, dv)
    if dlse is not None:
        # As in the torch backend: v = 0, dout = 1, out = -dlse / D add P * dlse to dS.
        ones = torch.ones_like(dout)
        shifted = (-dlse / q.shape[-1]).unsqueeze(-1).expand(dout.shape).to(dout.dtype)
        _task_grads(ones, q, k, torch.zeros_like(v), shifted.contiguous(), lse, tasks, scale,
                    dq, dk, None)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
