"""Attention statistics of any model without an S×S matrix (design §3): one code path for
training, evaluation and benchmarks.

Per layer, from q (N, Hq, D) after RoPE, the keys k (Nk, Hkv, D) (GQA: query head h reads key
head ``h // (Hq / Hkv)``), the rows' key-only log-sum-exp ``L`` (N, Hq) (what a kernel or the
runtime's dispatch returns, *before* any learnable sink) and a :class:`RowSpec`. With
``A_ij`` the attention weight of row i on key j, sinks included in the denominator
(``L'_i = logaddexp(L_i, s_h)``, ``= L_i`` without sinks):

- ``first_token_mass``: ``A_{i,f(i)} = exp(scale * q_i . k_{f(i)} - L'_i)``, ``f(i)`` the first
  token of row i's document (the classic sink): O(N·D) per head;
- ``context_mass``: ``sum_{j context} A_ij``: one extra attention forward over the same
  tasks whose values are the 0/1 context indicator gives ``sum_{j context} exp(s_ij - L_i)``,
  times ``exp(L_i - L'_i)``. Context = the non-response tokens of chat data (system, user,
  tool messages and assistant headers); FocuSFT's "context engagement" is not public, so this
  is ours (design §3). Not defined for text data;
- ``sink_mass``: learnable-sink share ``exp(s_h - L'_i) = sigma(s_h - L_i)``; 0 without sinks;
- ``sink_rate`` (Gu et al., "When Attention Sink Emerges"): the share of (layer, head) pairs
  whose mean first-token mass over the counted rows exceeds ``eps = 0.3``.

Every mass is averaged over the *counted* rows that see at least one key: the loss-bearing rows
of chat data (rows whose label is a reply token), every row of text data. Means over layers,
heads and rows weight every counted row alike (a micro-batch or example with more reply rows
weighs more), like the training loss.

:class:`AttentionStats` accumulates the per-(layer, head) sums in one fixed-size float64
tensor, so that a distributed runtime reduces a whole step's statistics with one all_reduce.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .merge import NEG_INF

SINK_EPS = 0.3  # Gu et al.'s threshold on a head's mean first-token mass

# (q, k, v) -> (out (N, Hq, Dv), lse (N, Hq) fp32) over the layer's own tasks, no sink
AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class RowSpec:
    """What a layer's rows are. ``first_key`` (N,) int64: index into k of the first token of
    each row's document; ``counted`` (N,) bool: rows the statistics average over;
    ``key_is_context`` (Nk,) bool: context (non-response) keys, None for text data (no context
    mass)."""

    first_key: torch.Tensor
    counted: torch.Tensor
    key_is_context: torch.Tensor | None = None

    @classmethod
    def from_documents(cls, doc_lengths, has_label, chat: bool,
                       device: torch.device | str = "cpu") -> RowSpec:
        """Rows of a packed stream: documents back to back from token 0 (``doc_lengths`` (D,)),
        ``has_label`` (N,) bool: rows with a next-token label (``labels != IGNORE`` of a
        :class:`PackedBatch`).

        Chat: counted rows are the loss-bearing ones; a key is a response token when the row
        before it in its document predicts it (``has_label[j-1]``), else context. Text: every
        row of a document counts and there is no context. Padding rows never count.
        """
        lengths = np.asarray(doc_lengths, dtype=np.int64)
        counted = np.asarray(has_label, dtype=bool)
        n, used = counted.shape[0], int(lengths.sum())
        starts = np.cumsum(lengths) - lengths
        first = np.zeros(n, dtype=np.int64)
        first[:used] = np.repeat(starts, lengths)
        in_doc = np.arange(n) < used
        if not chat:
            return cls(torch.as_tensor(first, device=device),
                       torch.as_tensor(in_doc, device=device))
        response = np.zeros(n, dtype=bool)
        response[1:] = counted[:-1]
        response[starts] = False  # a document's first token is nobody's target
        return cls(torch.as_tensor(first, device=device), torch.as_tensor(counted, device=device),
                   torch.as_tensor(in_doc & ~response, device=device))


@dataclass
class LayerMasses:
    """Per-row masses of one layer, each (N, Hq) float32 (0 for rows that see no key)."""

    first_token: torch.Tensor
    sink: torch.Tensor
    context: torch.Tensor | None  # None without context keys
    live: torch.Tensor  # (N,) bool: rows that see at least one key


@torch.no_grad()
def layer_masses(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, rows: RowSpec,
                 attend: AttendFn | None = None, sinks: torch.Tensor | None = None,
                 softmax_scale: float | None = None,
                 first_keys: torch.Tensor | None = None) -> LayerMasses:
    """The module docstring's masses of every row of one layer.

    q (N, Hq, D), k (Nk, Hkv, D) any float dtype; lse (N, Hq) the key-only log-sum-exp;
    sinks (Hq,) logits or None. ``attend`` runs attention over the layer's tasks (for the
    context mass; needed only when ``rows.key_is_context`` is set). ``first_keys`` (N, Hkv, D):
    each row's first-token key when it is not among ``k`` (a distributed runtime gathers them);
    default ``k[rows.first_key]``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    lse = lse.float()
    dead = lse == NEG_INF
    full = lse if sinks is None else torch.logaddexp(lse, sinks.float().to(lse.device))
    if first_keys is None:
        first_keys = k[rows.first_key]
    first_k = first_keys.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    first_logit = (q.float() * first_k.float()).sum(-1) * scale
    first = torch.where(dead, 0.0, torch.exp(first_logit - full))
    sink = torch.zeros_like(lse) if sinks is None else torch.where(
        dead, 0.0, torch.exp(sinks.float().to(lse.device) - full))
    context = None
    if rows.key_is_context is not None:
        if attend is None:
            raise ValueError("context mass needs `attend` (the layer's tasks)")
        # values = the context indicator: the output is the context share of the key softmax
        indicator = rows.key_is_context.to(device=k.device, dtype=q.dtype)
        share, _ = attend(q, k, indicator.view(-1, 1, 1).expand(k.shape).contiguous())
        context = torch.where(dead, 0.0, share[..., 0].float() * torch.exp(lse - full))
    return LayerMasses(first, sink, context, ~dead.all(-1))


class AttentionStats:
    """Running sums of a model's attention statistics over layers, heads and counted rows.

    ``sums``: (num_layers, 3 * num_heads + 1) float64, per layer the per-head sums of the
    first-token, context and sink masses over counted rows, then the number of counted rows.
    A distributed runtime feeds each rank's rows with :meth:`add` (or :meth:`add_masses`) and
    calls :meth:`all_reduce` once; every rank then reads the same :meth:`summary`.
    """

    def __init__(self, num_layers: int, num_heads: int, device: torch.device | str = "cpu",
                 has_context: bool = True, has_sinks: bool = False) -> None:
        self.num_layers, self.num_heads = num_layers, num_heads
        self.has_context, self.has_sinks = has_context, has_sinks
        self.sums = torch.zeros(num_layers, 3 * num_heads + 1, dtype=torch.float64,
                                device=device)

    def add(self, layer: int, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor,
            rows: RowSpec, attend: AttendFn | None = None, sinks: torch.Tensor | None = None,
            softmax_scale: float | None = None) -> None:
        """Accumulate layer ``layer`` (0-based) of these rows; arguments as :func:`layer_masses`."""
        self.add_masses(layer, layer_masses(q, k, lse, rows, attend, sinks, softmax_scale),
                        rows.counted)

    @torch.no_grad()
    def add_masses(self, layer: int, masses: LayerMasses, counted: torch.Tensor) -> None:
        """Accumulate precomputed per-row masses; ``counted`` (N,) bool selects the rows."""
        take = counted.to(masses.live.device) & masses.live
        h = self.num_heads
        row = self.sums[layer]
        row[:h] += masses.first_token[take].double().sum(0).to(row.device)
        if masses.context is not None:
            row[h:2 * h] += masses.context[take].double().sum(0).to(row.device)
        row[2 * h:3 * h] += masses.sink[take].double().sum(0).to(row.device)
        row[-1] += float(take.sum())

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> None:
        """Sum the statistics over ``group`` (every rank that holds rows): one collective."""
        dist.all_reduce(self.sums, group=group)

    def _per_head(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean first-token, context and sink mass per (layer, head), each (L, H) float64."""
        h = self.num_heads
        count = self.sums[:, -1:].clamp_min(1)
        return (self.sums[:, :h] / count, self.sums[:, h:2 * h] / count,
                self.sums[:, 2 * h:3 * h] / count)

    def summary(self, eps: float = SINK_EPS) -> dict:
        """``first_token_mass``, ``context_mass`` (with context), ``sink_mass`` (with sinks),
        ``sink_rate`` and ``per_layer`` lists of the same masses (one value a layer, the mean
        over its heads and counted rows); NaN where no row was counted."""
        counts = self.sums[:, -1]
        if not bool((counts > 0).any()):
            nan = float("nan")
            return {"first_token_mass": nan, "sink_rate": nan, "per_layer": {}}
        first, context, sink = self._per_head()
        weights = counts / counts.sum()  # row-weighted over layers (equal when all see the rows)
        names = [("first_token_mass", first, True), ("context_mass", context, self.has_context),
                 ("sink_mass", sink, self.has_sinks)]
        seen = counts > 0
        out: dict = {}
        per_layer: dict[str, list[float]] = {}
        for name, value, wanted in names:
            if not wanted:
                continue
            layer_mean = value.mean(1)
            out[name] = float((layer_mean * weights).sum())
            per_layer[name] = [float(v) if s else float("nan") for v, s in zip(layer_mean, seen)]
        out["sink_rate"] = float((first[seen] > eps).double().mean())
        out["per_layer"] = per_layer
        return out

    def metrics(self, eps: float = SINK_EPS) -> dict[str, float]:
        """:meth:`summary` flattened for metrics.jsonl: ``name`` and ``name_layer<i>``."""
        summary = self.summary(eps)
        flat = {k: v for k, v in summary.items() if k != "per_layer"}
        for name, values in summary["per_layer"].items():
            flat.update({f"{name}_layer{i}": v for i, v in enumerate(values)})
        return flat
