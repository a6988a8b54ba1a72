"""Merging partial attention results by LSE, and the learnable sink (design §2-3).

The sink logits are a parameter of the model (:func:`make_sinks`); the gate of gated attention
is megatron's (``attention_output_gate``), applied on the worker.

All functions take outputs ``O`` of shape (N, H, D) and row log-sum-exps ``L`` of shape (N, H)
float32 (float64 for float64 inputs), where ``L = -inf`` marks a row that saw no key (its ``O``
is 0). Arithmetic is in the dtype of ``L``.
"""

from __future__ import annotations

import torch
from torch import nn

NEG_INF = float("-inf")


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16-bit inputs and float32; float64 stays float64 (for oracle checks)."""
    return torch.promote_types(dtype, torch.float32)


def merge_into_(acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor,
                lse: torch.Tensor) -> None:
    """In place: fold one partial ``(out, lse)`` into the running ``(acc_out, acc_lse)``.

    ``acc_out`` (N, H, D) float32 and ``acc_lse`` (N, H) float32 are updated; ``out`` may be any
    float dtype. ``L = logaddexp(L_acc, L_t)``, ``O = exp(L_acc - L) O_acc + exp(L_t - L) O_t``.
    """
    new = torch.logaddexp(acc_lse, lse)
    live = new != NEG_INF
    safe = torch.where(live, new, 0.0)
    w_acc = torch.where(live, torch.exp(acc_lse - safe), 0.0)
    w_new = torch.where(live, torch.exp(lse - safe), 0.0)
    acc_out.mul_(w_acc.unsqueeze(-1)).add_(out.to(acc_out.dtype) * w_new.unsqueeze(-1))
    acc_lse.copy_(new)


def sink_weight(lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """(N, H) float32 ``w = sigmoid(L - s_h)``: the share of a row's mass left to the keys.

    Rows with ``L = -inf`` (no task) get 0.
    """
    return torch.sigmoid(lse - sinks.to(lse.dtype))


def apply_sink(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Add one learnable sink logit per head (a softmax column with no value) after merging.

    ``out`` (N, H, D), ``lse`` (N, H) float32, ``sinks`` (H,). Returns ``O' = O * w`` in
    ``out.dtype`` and ``L' = logaddexp(L, s_h)`` float32, where ``w = sigmoid(L - s_h)``.
    Rows with ``L = -inf`` belong to no task and stay ``O' = 0, L' = -inf``. Differentiable
    (plain torch ops), for callers that merge partial results themselves.
    """
    s = sinks.to(lse.dtype)
    live = lse != NEG_INF
    total = torch.logaddexp(lse, s.expand_as(lse))  # = s on rows with no task
    # w = exp(L - L') rather than sigmoid(L - s): autograd then gets dw/ds = -w exp(s - L'),
    # where sigmoid's w (1 - w) cancels to 0 in float32 once the sink is ~17 below L.
    w = torch.where(live, torch.exp(lse - total), 0.0)
    new_out = (out.to(lse.dtype) * w.unsqueeze(-1)).to(out.dtype)
    new_lse = torch.where(live, total, NEG_INF)
    return new_out, new_lse


def make_sinks(num_heads: int, init: float = 0.0, device=None,
               dtype: torch.dtype = torch.float32) -> nn.Parameter:
    """(num_heads,) learnable sink logits, one per query head, all set to ``init``.

    Pass the parameter as ``sinks=`` to :func:`distca.attention.core_attention`. With ``init``
    = 0 a head starts with a sink worth one key of score 0 (gpt-oss style); keep it in float32
    even in bf16 models, since the logit competes with a log-sum-exp over many keys.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    return nn.Parameter(torch.full((num_heads,), float(init), device=device, dtype=dtype))
