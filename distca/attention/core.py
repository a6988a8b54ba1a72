"""``core_attention``: the one entry point of sink-aware core attention over CA-tasks.

Backends (``torch``, ``cpp``, ``flash``, ``flex``) provide two primitives over a varlen task
list, ``forward -> (O, L)`` merged per row and ``backward`` given the merged ``O`` and ``L``
(see :mod:`distca.attention.torch_backend`). This module adds what is common to all of them:
input checks, backend choice, the learnable sink applied once after merging, and autograd.
"""

from __future__ import annotations

import functools
import importlib
import math
import warnings
from types import ModuleType

import torch
from torch.autograd.function import once_differentiable

from .gpu_probe import fused_on_cuda
from .merge import NEG_INF, accum_dtype, apply_sink, sink_weight
from .tasks import TaskList, make_task_list

BACKENDS = ("torch", "cpp", "flash", "flex")
_CPU_PREFERENCE = ("cpp", "torch")
_GPU_PREFERENCE = ("flash", "flex")


def _backend_module(name: str) -> ModuleType:
    return importlib.import_module(f"{__package__}.{name}_backend")


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on ``device`` here, best first."""
    device = torch.device(device)
    order = _GPU_PREFERENCE if device.type == "cuda" else _CPU_PREFERENCE
    return [name for name in order if _backend_module(name).is_available()]


@functools.cache
def _warn_cpp_fallback() -> None:
    reason = _backend_module("cpp").unavailable_reason()
    warnings.warn(f"distca attention: the cpp backend is unavailable ({reason}); "
                  f"backend='auto' uses the slower 'torch' backend", RuntimeWarning, stacklevel=3)


def resolve_backend(backend: str, device: torch.device) -> ModuleType:
    """The backend module for ``backend`` (``"auto"``: the best one available on ``device``)."""
    if backend == "auto":
        names = available_backends(device)
        if not names:
            raise RuntimeError(f"no attention backend can run on device {device}")
        if device.type == "cpu" and names[0] != "cpp":
            _warn_cpp_fallback()
        return _backend_module(names[0])
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    module = _backend_module(backend)
    if not module.is_available():
        raise RuntimeError(f"attention backend {backend!r} is not available: "
                           f"{module.unavailable_reason()}")
    if device.type not in module.DEVICES:
        raise ValueError(f"attention backend {backend!r} runs on {module.DEVICES}, "
                         f"got tensors on {device}")
    return module


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  sinks: torch.Tensor | None) -> None:
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(f"q, k, v must be (tokens, heads, head_dim), got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q head_dim {q.shape[2]} != k head_dim {k.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of kv heads "
                         f"({k.shape[1]})")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, "
                         f"{v.device}")
    if sinks is not None and (sinks.shape != (q.shape[1],) or sinks.device != q.device):
        raise ValueError(f"sinks must be ({q.shape[1]},) on {q.device}, got "
                         f"{tuple(sinks.shape)} on {sinks.device}")


def _prepare(q, k, v, q_ranges, kv_ranges, causal, sinks, softmax_scale, backend):
    _check_inputs(q, k, v, sinks)
    if isinstance(q_ranges, TaskList):
        tasks = q_ranges
        if (tasks.num_q, tasks.num_kv) != (q.shape[0], k.shape[0]):
            raise ValueError(f"the TaskList covers {tasks.num_q} query and {tasks.num_kv} key "
                             f"tokens, but q has {q.shape[0]} and k has {k.shape[0]}")
    else:
        tasks = make_task_list(q_ranges, kv_ranges, causal, q.shape[0], k.shape[0])
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    return tasks, scale, resolve_backend(backend, q.device)


_apply_sink = fused_on_cuda(apply_sink)


class _CoreAttention(torch.autograd.Function):
    """Merged varlen attention plus sink; backward by the ring-attention identity (design §2-3)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, tasks: TaskList, scale: float, impl: ModuleType):
        ctx.set_materialize_grads(False)  # an unused lse gets None: no gradient pass for it
        # A backend without a standalone backward (flex) runs kernel and sink as one graph and
        # keeps it for backward instead of recomputing the forward.
        ctx.graph, ctx.tasks, ctx.scale, ctx.impl = None, tasks, scale, impl
        if hasattr(impl, "forward_with_graph") and any(ctx.needs_input_grad[:4]):
            out, lse_out, ctx.graph = impl.forward_with_graph(q, k, v, sinks, tasks, scale)
            return out, lse_out
        out, lse = impl.forward(q, k, v, tasks, scale)
        lse_out = lse
        if sinks is not None:
            out, lse_out = _apply_sink(out, lse, sinks)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        return out, lse_out

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_lse):
        if ctx.graph is not None:
            dq, dk, dv, dsinks = ctx.impl.backward_from_graph(ctx.graph, d_out, d_lse)
            ctx.graph = None
        else:
            q, k, v, out, lse, sinks = ctx.saved_tensors
            if d_out is None:
                d_out = torch.zeros_like(out)
            dout, dlse, dsinks = _sink_backward(d_out, d_lse, out, lse, sinks)
            dq, dk, dv = ctx.impl.backward(dout, q, k, v, out, lse, ctx.tasks, ctx.scale, dlse)
        return dq, dk, dv, dsinks if ctx.needs_input_grad[3] else None, None, None, None


@fused_on_cuda
def _sink_backward(d_out, d_lse, out, lse, sinks):
    """What the kernel backward and the sink need from the output gradients.

    ``d_out`` (N, H, D), ``d_lse`` (N, H) float32 or None, ``out`` = O' and ``lse`` = L (before
    the sink), ``sinks`` (H,) or None. Returns the kernel's ``dout`` (N, H, D) in ``d_out``'s
    dtype, its ``dlse`` (N, H) or None, and ``dsinks`` (H,) or None.
    """
    live = lse != NEG_INF
    dlse = None if d_lse is None else torch.where(live, d_lse, 0.0)
    if sinks is None:
        return d_out, dlse, None
    # With the sink, O' = O * w and L' = logaddexp(L, s): the kernel backward gets
    # dout = w * dO' and out = O' (which folds dL/dO' into delta), and dL' reaches L as w * dL'.
    w = torch.where(live, sink_weight(lse, sinks), 0.0)
    dout = (d_out.to(w.dtype) * w.unsqueeze(-1)).to(d_out.dtype)
    # sigmoid(s - L), not 1 - w: at s << L, 1 - w cancels to 0 in float32. The sum over rows
    # mixes signs, so it is accumulated in float64 ((N, H) values: cheap).
    rest = torch.where(live, torch.sigmoid(sinks.double() - lse.double()), 0.0)
    acc = accum_dtype(out.dtype)
    per_row = -(d_out.to(acc) * out.to(acc)).sum(-1).double()
    if dlse is not None:
        per_row = per_row + dlse.double()
        dlse = dlse * w
    dsinks = (per_row * rest).sum(0).to(sinks.dtype)
    return dout, dlse, dsinks


def core_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_ranges, kv_ranges,
                   causal, sinks: torch.Tensor | None = None,
                   softmax_scale: float | None = None,
                   backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Sink-aware attention of a varlen list of CA-tasks, differentiable in q, k, v and sinks.

    Args:
        q: (Nq, Hq, D) queries; k, v: (Nk, Hkv, D) with Hq a multiple of Hkv (GQA).
        q_ranges, kv_ranges: (T, 2) int ``[start, end)`` token ranges of each task into q and
            k/v (or a prebuilt :class:`TaskList` as ``q_ranges``, with the other two ``None``).
        causal: (T,) bool, per task; causal masks are aligned bottom-right.
        sinks: optional (Hq,) learnable sink logit per head, applied once per row after all of
            the row's tasks are merged.
        softmax_scale: default ``1/sqrt(D)``.
        backend: ``"auto"`` (cpp, else torch on CPU; flash, else flex on CUDA), or a name.

    Returns:
        ``out`` (Nq, Hq, D) in q's dtype: attention of each query over the union of its
        tasks' keys (and the sink); ``lse`` (Nq, Hq) float32, the row log-sum-exp including
        the sink. Query tokens in no task get ``out = 0`` and ``lse = -inf``.
    """
    tasks, scale, impl = _prepare(q, k, v, q_ranges, kv_ranges, causal, sinks, softmax_scale,
                                  backend)
    return _CoreAttention.apply(q, k, v, sinks, tasks, scale, impl)


def attention_forward(q, k, v, q_ranges, kv_ranges, causal, softmax_scale=None,
                      backend="auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The raw forward primitive (no sink, no autograd): merged ``(out, lse)`` of the tasks.

    For runtimes that split a row's tasks across attention servers: merge the servers'
    results with :func:`distca.parallel.dispatch.merge_partials`, apply the sink with :func:`apply_sink`, and run the
    backward of each server's tasks with :func:`attention_backward` on the merged ``out``/``lse``.
    """
    tasks, scale, impl = _prepare(q, k, v, q_ranges, kv_ranges, causal, None, softmax_scale,
                                  backend)
    with torch.no_grad():
        return impl.forward(q, k, v, tasks, scale)


def attention_backward(dout, q, k, v, out, lse, q_ranges, kv_ranges, causal,
                       softmax_scale=None, dlse=None, backend="auto"):
    """The raw backward primitive: ``(dq, dk, dv)`` of the tasks given the rows' merged result.

    ``out`` (Nq, Hq, D) and ``lse`` (Nq, Hq) float32 are the merged results of the whole row
    (all servers, before the sink); ``dout`` is the gradient w.r.t. that merged ``out``;
    ``dlse`` (optional, (Nq, Hq) float32) the gradient w.r.t. the merged ``lse``. To include a
    sink, pass ``dout = w * dO'`` and ``out = O'`` as :func:`core_attention` does internally.
    """
    tasks, scale, impl = _prepare(q, k, v, q_ranges, kv_ranges, causal, None, softmax_scale,
                                  backend)
    with torch.no_grad():
        return impl.backward(dout, q, k, v, out, lse, tasks, scale, dlse)
