"""Attention statistics of a training step, from every rank and dedicated server (design §3).

Every ``attention.telemetry_interval`` steps the step runs one extra no-grad forward of its
micro-batches (:meth:`distca.step.Step.attention_statistics`) through blocking exchanges, with
an :class:`AttentionProbe` on the runtime. After each layer's attention the runtime hands the
probe this rank's q (after RoPE), k and the merged key-only log-sum-exp, and the probe adds the
layer's masses (first-token, context and learnable-sink mass; the formulas of
:mod:`distca.attention.telemetry`, the one statistics path of training, eval and benchmarks)
to per-(layer, head) sums. Two things cross ranks, both as collectives that a dedicated server
joins with nothing of its own — it runs the same step, through the same runtime:

* the first token of a document may live on another worker: the keys of every document's
  first token are summed into one (documents, kv heads, head dim) table over the exchange group
  (each owner writes its documents' rows, everyone else zeros);
* the context mass is one more attention through the same exchange, with the 0/1 context
  indicator as values, so each row's tasks are served where they were.

The sums are reduced over the world once at the end (tensor-parallel ranks hold disjoint heads:
they go at their head offset, and only tensor rank 0 counts rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from distca.attention import AttentionStats, RowSpec, layer_masses
from distca.batch import IGNORE, PackedBatch


@dataclass
class ProbeRows:
    """This rank's rows of one micro-batch, as the probe needs them.

    ``spec``: the rank's :class:`RowSpec` (``first_key`` unused: the first keys come from the
    gathered table); ``row_doc`` (N,) int64: each row's document (0 for padding, not counted);
    ``owned`` (D,) bool and ``owned_row`` (D,) int64: documents whose first token is one of this
    rank's rows, and that row.
    """

    spec: RowSpec
    row_doc: torch.Tensor
    num_docs: int
    owned: torch.Tensor
    owned_row: torch.Tensor

    @classmethod
    def one_document(cls, spec: RowSpec) -> ProbeRows:
        """The rows of one whole document held by one process (its first key is row 0)."""
        device = spec.counted.device
        return cls(spec, torch.zeros(spec.counted.shape[0], dtype=torch.int64, device=device), 1,
                   torch.ones(1, dtype=torch.bool, device=device),
                   torch.zeros(1, dtype=torch.int64, device=device))


def probe_rows(batch: PackedBatch, rows: slice, chat: bool, device: torch.device) -> ProbeRows:
    """The :class:`ProbeRows` of ``rows`` (this rank's slice of ``batch``; empty on a server)."""
    whole = RowSpec.from_documents(batch.doc_lengths, batch.labels != IGNORE, chat)
    lengths = np.asarray(batch.doc_lengths, dtype=np.int64)
    n, used = batch.tokens.shape[0], int(lengths.sum())
    doc = np.zeros(n, dtype=np.int64)
    doc[:used] = np.repeat(np.arange(lengths.size), lengths)
    starts = np.cumsum(lengths) - lengths
    lo, hi = rows.start or 0, rows.stop if rows.stop is not None else n
    owned = (starts >= lo) & (starts < hi)

    def mine(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[rows].to(device)

    spec = RowSpec(mine(whole.first_key), mine(whole.counted), mine(whole.key_is_context))
    return ProbeRows(spec, torch.as_tensor(doc[rows], device=device), int(lengths.size),
                     torch.as_tensor(owned, device=device),
                     torch.as_tensor(np.clip(starts - lo, 0, max(hi - lo - 1, 0)), device=device))


class AttentionProbe:
    """Adds this rank's layers to ``stats`` (the whole model's layers and heads; module
    docstring). ``head_offset``: this tensor rank's first query head; ``layer_offset``: this
    pipeline stage's first layer; ``group``: the exchange group (first-key tables; None in one
    process); ``counts_rows``: False on tensor ranks other than 0."""

    def __init__(self, stats: AttentionStats, head_offset: int = 0, layer_offset: int = 0,
                 group: dist.ProcessGroup | None = None, counts_rows: bool = True,
                 device: torch.device | str = "cpu") -> None:
        self.stats = stats
        self.head_offset, self.layer_offset = head_offset, layer_offset
        self.group, self.counts_rows, self.device = group, counts_rows, device
        self.rows: ProbeRows | None = None
        self.layer = 0

    def start_micro_batch(self, rows: ProbeRows) -> None:
        self.rows, self.layer = rows, 0

    @torch.no_grad()
    def observe(self, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, attend,
                sinks: torch.Tensor | None, softmax_scale: float) -> None:
        """One layer: q (N, hq, d) after RoPE, k (N, hkv, d), lse (N, hq) key-only; ``attend``
        (q, k, v) runs attention through the micro-batch's exchange (collective)."""
        r = self.rows
        table = torch.zeros(r.num_docs, k.shape[1], k.shape[2], dtype=torch.float32,
                            device=self.device)
        if r.owned.any():
            table[r.owned] = k.float().index_select(0, r.owned_row[r.owned])
        if self.group is not None and dist.get_world_size(self.group) > 1:
            dist.all_reduce(table, group=self.group)
        masses = layer_masses(q, k, lse, r.spec, attend, sinks, softmax_scale,
                              first_keys=table.index_select(0, r.row_doc).to(k.dtype))
        heads = q.shape[1]
        local = AttentionStats(1, heads, self.device, self.stats.has_context, self.stats.has_sinks)
        local.add_masses(0, masses, r.spec.counted)
        row, h, hg, o = local.sums[0], heads, self.stats.num_heads, self.head_offset
        target = self.stats.sums[self.layer_offset + self.layer]
        for part in range(3):  # first-token, context, sink sums at this rank's head offset
            target[part * hg + o:part * hg + o + h] += row[part * h:(part + 1) * h]
        if self.counts_rows:  # tensor ranks share the rows: one of them counts them
            target[-1] += row[-1]
        self.layer += 1

