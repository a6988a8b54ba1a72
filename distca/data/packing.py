"""Pack documents into one :class:`~distca.batch.PackedBatch` of ``R * T`` tokens."""

from __future__ import annotations

import numpy as np

from distca.batch import IGNORE, PackedBatch


def labels_for(tokens: np.ndarray, doc_lengths: np.ndarray, total: int) -> np.ndarray:
    """(total,) int64 next-token targets: the following token of the same document, else -100.

    ``tokens`` is the (N,) int64 stream of the documents back to back, ``N = sum(doc_lengths)
    <= total``; positions from N to ``total`` are padding.
    """
    labels = np.full(total, IGNORE, dtype=np.int64)
    used = tokens.shape[0]
    labels[: used - 1] = tokens[1:used]
    labels[np.cumsum(doc_lengths) - 1] = IGNORE  # a document's last token predicts nothing
    return labels


def pack(documents: list[np.ndarray], num_ranks: int, tokens_per_rank: int) -> PackedBatch:
    """Lay ``documents`` (1-D int64 token arrays, total length <= R*T) out back to back.

    Tokens after the last document are padding (id 0, label -100). A document may span ranks.
    """
    total = num_ranks * tokens_per_rank
    docs = [d for d in documents if d.size]
    lengths = np.asarray([d.size for d in docs], dtype=np.int64)
    used = int(lengths.sum())
    if used > total:
        raise ValueError(f"{used} document tokens do not fit in {num_ranks} x {tokens_per_rank}")
    tokens = np.zeros(total, dtype=np.int64)
    if docs:
        tokens[:used] = np.concatenate(docs)
    return PackedBatch(tokens=tokens, labels=labels_for(tokens[:used], lengths, total),
                       doc_lengths=lengths, tokens_per_rank=tokens_per_rank)


def join_packs(packs: list[PackedBatch], tokens_per_rank: int) -> PackedBatch:
    """One micro-batch of ``packs`` side by side (each a one-rank :class:`PackedBatch`).

    A pack's padding, except the last pack's, becomes a document of its own with no loss (and
    one causal turn when the packs have turns), so that documents stay back to back: it costs
    a little attention and changes no other document's numbers."""
    with_turns = packs[0].turn_lengths is not None
    lengths, turns, context = [], [], []
    for k, p in enumerate(packs):
        lengths.append(p.doc_lengths)
        if with_turns:
            turns.append(p.turn_lengths)
            context.append(p.turn_is_context)
        pad = p.tokens.size - int(p.doc_lengths.sum())
        if pad and k < len(packs) - 1:
            lengths.append(np.array([pad], dtype=np.int64))
            if with_turns:
                turns.append(np.array([pad], dtype=np.int64))
                context.append(np.array([False]))
    return PackedBatch(tokens=np.concatenate([p.tokens for p in packs]),
                       labels=np.concatenate([p.labels for p in packs]),
                       doc_lengths=np.concatenate(lengths), tokens_per_rank=tokens_per_rank,
                       turn_lengths=np.concatenate(turns) if with_turns else None,
                       turn_is_context=np.concatenate(context) if with_turns else None)
