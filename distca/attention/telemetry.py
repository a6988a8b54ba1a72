"""Attention-sink telemetry per layer and head without an S×S matrix (design §3).

Formulas, for query row ``i`` of head ``h`` with merged log-sum-exp ``L'_i`` (sink included,
as returned by :func:`core_attention`) and ``A_ij`` its attention weight on key ``j``:

- learnable-sink mass: ``exp(s_h - L'_i) = sigma(s_h - L_i)`` with ``L`` the key-only
  log-sum-exp (design §3 writes ``sigma(s_h - L'_i)``; that is the same only with ``L`` in
  place of ``L'``); 0 without sinks;
- first-token mass (the classic sink): ``A_{i,f(i)} = exp(scale * q_i . k_f(i) - L'_i)``, where
  ``f(i)`` is the first token of row i's document: O(S·d) per head;
- context mass (with a loss mask): ``sum_{j context} A_ij``, computed as one attention forward
  whose values are the 0/1 context indicator, times ``sigma(L_i - s_h)`` for the sink. Averaged
  over response rows (the rows with loss), with response mass ``sum_{j response} A_ij`` beside
  it. FocuSFT's exact "context engagement" definition is not public; these are ours;
- sink rate (Gu et al., "When Attention Sink Emerges"): a head has a sink at the first token if
  ``alpha = mean_i A_{i,f(i)} > eps`` (eps = 0.3) over a random sample of rows that see it; the
  rate is the share of (layer, head) pairs with one (:func:`sink_rate`).

Every statistic is a mean over rows that see at least one key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .core import attention_forward
from .merge import NEG_INF
from .tasks import TaskList


@dataclass
class SinkTelemetry:
    """Per-head statistics of one layer; every field is (H,) float32 except ``has_sink`` (bool)."""

    sink_mass: torch.Tensor
    first_token_mass: torch.Tensor
    sampled_first_token_mass: torch.Tensor
    has_sink: torch.Tensor
    context_mass: torch.Tensor | None = None
    response_mass: torch.Tensor | None = None


def _row_mean(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean over the selected rows of (N, H) values -> (H,); NaN where no row is selected."""
    return values[rows].float().mean(0) if bool(rows.any()) else torch.full(
        values.shape[1:], float("nan"), device=values.device)


@torch.no_grad()
def sink_telemetry(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, tasks: TaskList,
                   doc_starts: torch.Tensor, sinks: torch.Tensor | None = None,
                   loss_mask: torch.Tensor | None = None, softmax_scale: float | None = None,
                   sample_rows: int = 4096, eps: float = 0.3,
                   generator: torch.Generator | None = None,
                   backend: str = "auto") -> SinkTelemetry:
    """Sink statistics of one layer from its q, k and the merged ``lse`` of core_attention.

    Args:
        q: (Nq, Hq, D); k: (Nk, Hkv, D); lse: (Nq, Hq) float32 as returned with the sinks.
        tasks: the layer's :class:`TaskList`.
        doc_starts: (Nq,) int64 index into k of the first token of each query's document;
            each row must see that token (true for causal documents and GLM multi-turn masks).
        sinks: (Hq,) sink logits if the layer has them.
        loss_mask: (Nk,) bool, True for response tokens (q and k index the same tokens).
        sample_rows: rows sampled for the sink-rate test.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    live = (lse != NEG_INF).all(-1)
    groups = q.shape[1] // k.shape[1]
    lse = lse.float()
    if sinks is not None:
        sink_mass = torch.where(lse == NEG_INF, 0.0, torch.exp(sinks.float() - lse))
    else:
        sink_mass = torch.zeros_like(lse)

    first_keys = k[doc_starts].repeat_interleave(groups, dim=1)  # (Nq, Hq, D)
    first_logit = (q.float() * first_keys.float()).sum(-1) * scale
    first_mass = torch.where(lse == NEG_INF, 0.0, torch.exp(first_logit - lse))

    live_rows = live.nonzero().squeeze(1)
    pick = torch.randperm(live_rows.numel(), generator=generator)[:sample_rows]
    sampled = torch.zeros_like(live)
    sampled[live_rows[pick.to(live_rows.device)]] = True
    alpha = _row_mean(first_mass, sampled)

    result = SinkTelemetry(sink_mass=_row_mean(sink_mass, live),
                           first_token_mass=_row_mean(first_mass, live),
                           sampled_first_token_mass=alpha, has_sink=alpha > eps)
    if loss_mask is not None:
        loss_mask = loss_mask.to(device=q.device, dtype=torch.bool)
        context = (~loss_mask).to(q.dtype).view(-1, 1, 1).expand(k.shape).contiguous()
        plain_ctx, plain_lse = attention_forward(q, k, context, tasks, None, None,
                                                 softmax_scale=scale, backend=backend)
        keys_share = torch.where(lse == NEG_INF, 0.0, torch.exp(plain_lse.float() - lse))
        ctx = plain_ctx[..., 0].float() * keys_share
        response_rows = live & loss_mask[: q.shape[0]]
        result.context_mass = _row_mean(ctx, response_rows)
        result.response_mass = _row_mean(keys_share - ctx, response_rows)
    return result


def sink_rate(layers: list[SinkTelemetry]) -> float:
    """Percent of (layer, head) pairs whose heads have a sink at the first token."""
    flags = torch.cat([layer.has_sink.flatten().cpu() for layer in layers])
    return 100.0 * flags.float().mean().item() if flags.numel() else float("nan")
