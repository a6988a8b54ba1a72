"""Model-side pieces of sink-aware attention: learnable sink logits and output gating (design §3).

The attention servers only ever see q, k, v and the sink logits; the gate is computed by the
worker's ``q_proj`` and applied there, after the merged attention output comes back and before
``o_proj`` (Qwen3-Next / "Gated Attention for LLMs").
"""

from __future__ import annotations

import torch
from torch import nn


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


def split_query_and_gate(projected: torch.Tensor, num_heads: int, head_dim: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a gated ``q_proj`` output (N, H * 2 * D) into queries and gates, each (N, H, D).

    Each head's query channels come first, then its gate channels, so TP sharding by heads
    keeps a head's query and gate on the same rank.
    """
    expected = num_heads * 2 * head_dim
    if projected.shape[-1] != expected:
        raise ValueError(f"gated q_proj output has {projected.shape[-1]} features, expected "
                         f"{expected} = heads {num_heads} x 2 x head_dim {head_dim}")
    both = projected.view(*projected.shape[:-1], num_heads, 2, head_dim)
    return both[..., 0, :], both[..., 1, :]


def apply_gate(attn_out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``attn_out * sigmoid(gate)`` per head and channel; both (N, H, D), any float dtype."""
    if attn_out.shape != gate.shape:
        raise ValueError(f"gate shape {tuple(gate.shape)} != attention output shape "
                         f"{tuple(attn_out.shape)}")
    return attn_out * torch.sigmoid(gate.to(attn_out.dtype))
