"""The float64 oracle of the attention tests: attention with a materialised dense mask.

It builds the O(S²) scores on purpose; production attention never does.
"""

from __future__ import annotations

import math

import torch


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                    sinks: torch.Tensor | None = None, softmax_scale: float | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with a materialised (Nq, Nk) bool mask, differentiable, in q's dtype.

    ``q`` (Nq, Hq, D), ``k``/``v`` (Nk, Hkv, D), ``sinks`` (Hq,). Returns ``out`` (Nq, Hq, D)
    and ``lse`` (Nq, Hq), the sink included. Rows that see no key get 0 and -inf. Use float64
    inputs for an oracle.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    groups = q.shape[1] // k.shape[1]
    kh = k.repeat_interleave(groups, dim=1).transpose(0, 1)  # (Hq, Nk, D)
    vh = v.repeat_interleave(groups, dim=1).transpose(0, 1)
    scores = torch.matmul(q.transpose(0, 1), kh.transpose(1, 2)) * scale  # (Hq, Nq, Nk)
    scores = scores.masked_fill(~mask, float("-inf"))
    live = mask.any(1)  # (Nq,)
    if sinks is not None:
        sink_col = sinks.to(scores.dtype).view(-1, 1, 1).expand(-1, q.shape[0], 1)
        scores = torch.cat([scores, sink_col], dim=2)
    lse = torch.logsumexp(scores, dim=2)  # (Hq, Nq)
    probs = torch.exp(scores - torch.where(live, lse, 0.0).unsqueeze(-1))
    probs = torch.where(live.view(1, -1, 1), probs, 0.0)[..., : k.shape[0]]
    out = torch.matmul(probs, vh).transpose(0, 1)
    lse = torch.where(live, lse, float("-inf")).transpose(0, 1)
    return out, lse
