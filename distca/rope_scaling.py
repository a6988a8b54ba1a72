"""RoPE frequency scaling of pretrained long-context models: Llama-3's (``rope_type:
llama3``) and YaRN (``rope_type: yarn``), as ``model.rope_scaling`` and as Hugging Face writes
them. The formulas are transformers' (``modeling_rope_utils``), evaluated in float64.

* llama3: wavelengths longer than ``original_max_position_embeddings / low_freq_factor`` are
  divided by ``factor``, shorter than ``.../ high_freq_factor`` kept, and those between blended
  linearly in ``original / wavelength``.
* yarn: per-dimension blend of the interpolated (``/ factor``) and original frequencies by a
  linear ramp between the dimensions that turn ``beta_fast`` and ``beta_slow`` times over the
  original context; cos and sin are multiplied by ``attention_factor`` (0: ``0.1 ln(factor) + 1``).

No dependency on :mod:`distca.config`, which holds this section.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

ROPE_TYPES = ("none", "llama3", "yarn")


@dataclass
class RopeScalingConfig:
    """``model.rope_scaling``: the pretrained model's RoPE frequency scaling."""

    type: str = "none"  # none | llama3 | yarn
    factor: float = 1.0
    original_max_position_embeddings: int = 0  # the pretraining context (llama3, yarn)
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float = 0.0  # yarn: cos/sin scale; 0 = 0.1 ln(factor) + 1
    truncate: bool = True  # yarn: round the ramp's ends outwards


def validate_rope_scaling(r: RopeScalingConfig, fail: Callable[[str, str], Exception]) -> None:
    key = "model.rope_scaling"
    if r.type not in ROPE_TYPES:
        raise fail(f"{key}.type", f"unknown RoPE scaling {r.type!r} ({', '.join(ROPE_TYPES)})")
    if r.type == "none":
        return
    if not r.factor >= 1:
        raise fail(f"{key}.factor", f"must be >= 1, got {r.factor}")
    if r.original_max_position_embeddings < 1:
        raise fail(f"{key}.original_max_position_embeddings",
                   f"rope_scaling.type={r.type} needs the pretraining context length")
    if r.type == "llama3" and not 0 < r.low_freq_factor < r.high_freq_factor:
        raise fail(f"{key}.high_freq_factor", "need 0 < low_freq_factor < high_freq_factor")
    if r.attention_factor < 0:
        raise fail(f"{key}.attention_factor", f"must be >= 0, got {r.attention_factor}")


def scaled_frequencies(head_dim: int, theta: float, r: RopeScalingConfig | None
                       ) -> tuple[torch.Tensor, float]:
    """(inverse frequencies (head_dim/2,) float64, cos/sin scale) of RoPE with scaling ``r``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if r is None or r.type == "none":
        return inv_freq, 1.0
    old = r.original_max_position_embeddings
    if r.type == "llama3":
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = old / r.low_freq_factor, old / r.high_freq_factor
        scaled = torch.where(wavelen > low_wavelen, inv_freq / r.factor, inv_freq)
        smooth = (old / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
        blended = (1 - smooth) * scaled / r.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, scaled), 1.0

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(r.beta_fast), correction_dim(r.beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = inv_freq / r.factor * (1 - extrapolation) + inv_freq * extrapolation
    scale = r.attention_factor or (0.1 * math.log(r.factor) + 1.0 if r.factor > 1 else 1.0)
    return inv_freq, scale


def rope_scaling_from_hf(params: dict[str, Any], max_position_embeddings: int,
                         refuse: Callable[[str, str], Exception]) -> dict[str, Any]:
    """``model.rope_scaling`` of a Hugging Face ``rope_scaling`` / ``rope_parameters`` dict
    (``refuse(key, message)`` makes the error for a kind or key not computed here)."""
    kind = params.get("rope_type", params.get("type"))
    if kind in (None, "default"):
        return {"type": "none"}
    if kind not in ("llama3", "yarn"):
        raise refuse("rope_type", f"RoPE scaling {kind!r} is not supported (llama3, yarn)")
    for key in ("mscale", "mscale_all_dim", "partial_rotary_factor"):
        if params.get(key) not in (None, 1, 1.0, 0):
            raise refuse(key, f"{params[key]!r} is not supported")
    out = {"type": kind,
           "original_max_position_embeddings":
               int(params.get("original_max_position_embeddings") or max_position_embeddings)}
    out["factor"] = float(params.get("factor") or
                          max_position_embeddings / out["original_max_position_embeddings"])
    names = (("low_freq_factor", "high_freq_factor") if kind == "llama3" else
             ("beta_fast", "beta_slow", "attention_factor"))
    out.update({k: float(params[k]) for k in names if params.get(k) is not None})
    if kind == "yarn":
        out["truncate"] = bool(params.get("truncate", True))
    return out


def rope_scaling_to_hf(r: RopeScalingConfig) -> dict[str, Any] | None:
    """The Hugging Face ``rope_scaling`` dict of ``r`` (None without scaling)."""
    if r.type == "none":
        return None
    out = {"rope_type": r.type, "factor": r.factor,
           "original_max_position_embeddings": r.original_max_position_embeddings}
    if r.type == "llama3":
        out.update(low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor)
    else:
        out.update(beta_fast=r.beta_fast, beta_slow=r.beta_slow, truncate=r.truncate)
        if r.attention_factor:
            out["attention_factor"] = r.attention_factor
    return out
