"""Rotary position embedding at each token's logical position in its document.

Megatron's own RoPE indexes positions by the token's place in the packed sequence; a document
that starts on an earlier worker needs its true offset instead, so distca applies RoPE itself,
in the core-attention submodule, from per-token position ids. The layout is Megatron's and
Hugging Face Llama's non-interleaved "rotate half" convention, so checkpoints carry over.
"""

from __future__ import annotations

import torch

from distca.rope_scaling import RopeScalingConfig, scaled_frequencies


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float,
                scaling: RopeScalingConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (N, head_dim) fp32 for int64 ``positions`` (N,), with the pretrained
    model's frequency ``scaling`` (Llama-3, YaRN) if any."""
    inv_freq, scale = scaled_frequencies(head_dim, theta, scaling)
    freqs = positions.to(torch.float64)[:, None] * inv_freq.to(positions.device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).float(), (emb.sin() * scale).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (N, H, head_dim) by tables (N, head_dim); computed in fp32, returned in x.dtype."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)
