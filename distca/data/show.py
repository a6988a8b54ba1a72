"""``distca data show``: the global batch of a training step as the trainer builds it, for
people to read (decoded text, loss-bearing tokens marked) or for programs (JSON).

The batches come from :func:`~distca.data.make_dataset` and ``Dataset.step_batches`` — the
calls the training driver makes — so what is shown is what step N trains on (before any
``trainer.on_nan=rollback`` shifts later steps' data).
"""

from __future__ import annotations

import numpy as np

from distca.batch import PackedBatch
from distca.data.packing import IGNORE

LOSS_OPEN, LOSS_CLOSE = "\u27e6", "\u27e7"  # ⟦ ⟧ around tokens that are loss targets


def describe(batch: PackedBatch) -> dict:
    """One micro-batch as JSON: per document its token ids, labels (-100: no loss), turns."""
    docs = []
    turns = list(zip(batch.turn_lengths.tolist(), batch.turn_is_context.tolist())) \
        if batch.turn_lengths is not None else []
    start = 0
    for length in batch.doc_lengths.tolist():
        doc = {"start": start, "length": length,
               "tokens": batch.tokens[start:start + length].tolist(),
               "labels": batch.labels[start:start + length].tolist()}
        if turns:
            doc["turns"], at = [], start
            while at < start + length:
                n, context = turns.pop(0)
                doc["turns"].append({"start": at, "length": n,
                                     "kind": "context" if context else "response"})
                at += n
        docs.append(doc)
        start += length
    return {"tokens_per_rank": batch.tokens_per_rank, "ranks": batch.num_ranks,
            "padding": int(batch.tokens.size - start),
            "loss_tokens": int((batch.labels != IGNORE).sum()), "documents": docs}


def render(doc: dict, decode) -> str:
    """A document as text with the loss targets (tokens some label predicts) in ⟦ ⟧; ``decode``
    maps token ids to text, or is None to print the ids."""
    ids = np.asarray(doc["tokens"])
    target = np.zeros(ids.size, bool)
    target[1:] = np.asarray(doc["labels"][:-1]) != IGNORE
    pieces = []
    cuts = np.flatnonzero(np.diff(target.astype(np.int8))) + 1
    for a, b in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [ids.size]])):
        span = ids[a:b].tolist()
        text = decode(span) if decode else " ".join(map(str, span))
        pieces.append(f"{LOSS_OPEN}{text}{LOSS_CLOSE}" if target[a] else text)
    return ("" if decode else " ").join(pieces)
