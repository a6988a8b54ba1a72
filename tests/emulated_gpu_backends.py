"""The GPU backends' Python layers run on the CPU, for machines (and CI) without a GPU.

Only their kernels are swapped:

- ``flash`` calls a stand-in ``flash_attn.flash_attn_interface`` with flash-attn's varlen
  contract, in two generations: 2.5 (plain functions, ``window_size`` tuple, 8-tuple forward
  result) and >= 2.6 (``torch.library.custom_op`` objects, ``window_size_left/right``,
  ``softcap``, 4-tuple result). Its math is dense float64 per sequence: bottom-right causal,
  GQA, LSE (H, total_q) float32 with +inf on rows that see no key, and a backward that, like
  flash-attn's, takes ``delta = rowsum(dout * out)`` from the ``out`` it is given. Unlike
  flash-attn it also takes float32, so that the backend's own arithmetic is held to the fp32
  tolerance; head dims must be multiples of 8 up to 256, as flash-attn's checks demand.
- ``flex`` runs the uncompiled graph (torch's eager flex_attention, which refuses CPU
  gradients only in a device check): block mask, slot tables, ``mask_mod``, padding, the sink
  inside the graph and the split backward are the product's own code.

What this cannot show: flash-attn's CUDA kernels, and flex compiled by inductor/triton.
"""

from __future__ import annotations

import types

import pytest
import torch

from distca.attention import flash_backend, flex_backend
from distca.attention.core import _backend_module

EMULATED = {"flash-2.5@cpu": "flash", "flash-2.6@cpu": "flash", "flex-eager@cpu": "flex"}


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, Hkv, D) -> (Hq, N, D) float64, kv heads repeated for GQA."""
    return x.double().repeat_interleave(heads // x.shape[1], dim=1).transpose(0, 1)


def _sequences(cu_q: torch.Tensor, cu_k: torch.Tensor, causal: bool):
    """Per sequence: query slice, key slice and the (|q|, |k|) bool mask (bottom-right)."""
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for a, b, c, d in zip(cq, cq[1:], ck, ck[1:]):
        rows, cols = torch.arange(b - a).unsqueeze(1), torch.arange(d - c).unsqueeze(0)
        mask = cols <= rows + (d - c) - (b - a) if causal else torch.ones(b - a, d - c,
                                                                          dtype=torch.bool)
        yield slice(a, b), slice(c, d), mask


def _check_plain(q: torch.Tensor, dropout_p: float, window: tuple[int, int], softcap: float,
                 alibi) -> None:
    assert q.shape[-1] % 8 == 0 and q.shape[-1] <= 256, f"flash-attn rejects head dim {q.shape[-1]}"
    assert dropout_p == 0.0 and window == (-1, -1) and softcap == 0.0 and alibi is None


def _forward(q, k, v, cu_q, cu_k, scale, causal):
    """(out like q, lse (H, total_q) float32 with +inf where a row sees no key)."""
    heads = q.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full((heads, q.shape[0]), float("inf"), dtype=torch.float32)
    kh, vh = _heads(k, heads), _heads(v, heads)
    for rq, rk, mask in _sequences(cu_q, cu_k, causal):
        scores = (q[rq].double().transpose(0, 1) @ kh[:, rk].transpose(1, 2)) * scale
        scores = scores.masked_fill(~mask, float("-inf"))
        row = torch.logsumexp(scores, -1)
        live = torch.isfinite(row)
        probs = torch.where(live.unsqueeze(-1), torch.exp(scores - row.unsqueeze(-1)), 0.0)
        out[rq] = (probs @ vh[:, rk]).transpose(0, 1)
        lse[:, rq] = torch.where(live, row, float("inf")).float()
    return out.to(q.dtype), lse


def _backward(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, scale, causal):
    """Writes dq, dk, dv in place; returns ``delta`` (H, total_q) float32 as flash-attn does."""
    heads, groups = q.shape[1], q.shape[1] // k.shape[1]
    kh, vh = _heads(k, heads), _heads(v, heads)
    gq = torch.zeros(q.shape, dtype=torch.float64).transpose(0, 1)
    gk, gv = torch.zeros_like(kh), torch.zeros_like(vh)
    do, qh = dout.double().transpose(0, 1), q.double().transpose(0, 1)
    delta = (dout.double() * out.double()).sum(-1).transpose(0, 1)  # (H, total_q)
    for rq, rk, mask in _sequences(cu_q, cu_k, causal):
        scores = (qh[:, rq] @ kh[:, rk].transpose(1, 2)) * scale
        probs = torch.exp(scores - lse[:, rq].double().unsqueeze(-1)).masked_fill(~mask, 0.0)
        gv[:, rk] += probs.transpose(1, 2) @ do[:, rq]
        ds = probs * (do[:, rq] @ vh[:, rk].transpose(1, 2) - delta[:, rq].unsqueeze(-1))
        gq[:, rq] += scale * ds @ kh[:, rk]
        gk[:, rk] += scale * ds.transpose(1, 2) @ qh[:, rq]
    dq.copy_(gq.transpose(0, 1))
    for grad, into in ((gk, dk), (gv, dv)):
        into.copy_(grad.unflatten(0, (-1, groups)).sum(1).transpose(0, 1))
    return delta.float()


def _flash_2_5() -> types.ModuleType:
    def _flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                   max_seqlen_k, dropout_p, softmax_scale, causal, window_size,
                                   alibi_slopes, return_softmax, block_table=None):
        _check_plain(q, dropout_p, tuple(window_size), 0.0, alibi_slopes)
        out, lse = _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)
        return out, q, k, v, out, lse, None, None

    def _flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q,
                                    cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                    softmax_scale, causal, window_size, alibi_slopes,
                                    deterministic, rng_state=None):
        _check_plain(q, dropout_p, tuple(window_size), 0.0, alibi_slopes)
        delta = _backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q,
                          cu_seqlens_k, softmax_scale, causal)
        return dq, dk, dv, delta

    module = types.ModuleType("flash_attn.flash_attn_interface")
    module._flash_attn_varlen_forward = _flash_attn_varlen_forward
    module._flash_attn_varlen_backward = _flash_attn_varlen_backward
    return module


@torch.library.custom_op("distca_test_flash::varlen_forward", mutates_args=())
def _custom_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float,
    softmax_scale: float, causal: bool, window_size_left: int = -1,
    window_size_right: int = -1, softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None, return_softmax: bool = False,
    block_table: torch.Tensor | None = None, leftpad_k: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None, zero_tensors: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_plain(q, dropout_p, (window_size_left, window_size_right), softcap, alibi_slopes)
    out, lse = _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)
    return out, lse, torch.empty(0), torch.empty(2, dtype=torch.int64)


@torch.library.custom_op("distca_test_flash::varlen_backward", mutates_args=("dq", "dk", "dv"))
def _custom_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    softmax_lse: torch.Tensor, dq: torch.Tensor | None, dk: torch.Tensor | None,
    dv: torch.Tensor | None, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, dropout_p: float, softmax_scale: float,
    causal: bool, window_size_left: int = -1, window_size_right: int = -1,
    softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False, rng_state: torch.Tensor | None = None,
    zero_tensors: bool = False,
) -> torch.Tensor:
    _check_plain(q, dropout_p, (window_size_left, window_size_right), softcap, alibi_slopes)
    return _backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                     softmax_scale, causal)


def _flash_2_6() -> types.ModuleType:
    module = types.ModuleType("flash_attn.flash_attn_interface")
    module._flash_attn_varlen_forward = _custom_forward
    module._flash_attn_varlen_backward = _custom_backward
    return module


def emulate(name: str, monkeypatch) -> str:
    """Make backend ``EMULATED[name]`` run on the CPU for one test; returns the backend name."""
    backend = EMULATED[name]
    module = {"flash": flash_backend, "flex": flex_backend}[backend]
    monkeypatch.setattr(module, "DEVICES", ("cpu",))
    monkeypatch.setattr(module, "unavailable_reason", lambda: None)
    if backend == "flash":
        interface = _flash_2_5() if name == "flash-2.5@cpu" else _flash_2_6()
        monkeypatch.setattr(flash_backend, "_interface", lambda: interface)
    else:
        import torch.nn.attention.flex_attention as flex

        monkeypatch.setattr(flex, "_validate_device", lambda *tensors: None)
        monkeypatch.setattr(flex_backend, "_compiled_attention", lambda: flex_backend._attention)
    return backend


def gpu_backend_for(name: str, request) -> str:
    """Backend ``name`` on its GPU (skipped where absent), or an ``EMULATED`` one on the CPU."""
    if name in EMULATED:
        return emulate(name, request.getfixturevalue("monkeypatch"))
    module = _backend_module(name)
    if not module.is_available():
        pytest.skip(module.unavailable_reason())
    return name
