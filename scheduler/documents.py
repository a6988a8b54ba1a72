"""Documents of one step and the linear-layer layout they sit in (design §2).

All token coordinates are *global* indices in the packed stream of one micro-batch: documents lie
back to back from token 0, worker ``w`` holds tokens ``[w*T, (w+1)*T)``, and tokens after the last
document are padding. A document is cut into *turns*: a causal (pretraining) document is one causal
turn; a FocuSFT document alternates bidirectional context turns and causal response turns, and
every token also sees all earlier turns of its document.

The unit the planners work on is a *segment*: one turn cut at worker boundaries. A segment
``[q_start, q_end)`` on its home worker is one CA-task ``(q=[q_start, q_end), kv=[doc start,
kv_end), causal)``: for a causal turn ``kv_end = q_end`` (bottom-right aligned, so row ``p`` sees
``[doc start, p]``); for a context turn ``kv_end`` is the turn's end.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Document:
    """One document: ``length`` tokens from global token ``start``.

    ``turn_lengths`` (ints summing to ``length``) and ``turn_is_context`` (bools) describe FocuSFT
    turns; both ``None`` means one causal turn.
    """

    start: int
    length: int
    turn_lengths: tuple[int, ...] | None = None
    turn_is_context: tuple[bool, ...] | None = None


class DocumentBatch(Sequence[Document]):
    """The documents of one step as flat arrays (fast to plan with); indexing yields Documents.

    Arrays (all int64 unless said): ``doc_start``/``doc_length`` (D,); ``turn_start``/
    ``turn_length``/``turn_doc`` (U,), ``turn_is_context`` (U,) bool. Documents without turns carry
    one causal turn covering the whole document.
    """

    def __init__(self, doc_length: np.ndarray, turn_length: np.ndarray,
                 turn_doc: np.ndarray, turn_is_context: np.ndarray, has_turns: np.ndarray):
        self.doc_length = doc_length
        self.doc_start = np.cumsum(doc_length) - doc_length
        self.turn_length = turn_length
        self.turn_doc = turn_doc
        self.turn_is_context = turn_is_context
        self.turn_start = np.cumsum(turn_length) - turn_length
        self.has_turns = has_turns  # (D,) bool: whether the caller gave turns for the document

    def __len__(self) -> int:
        return int(self.doc_length.shape[0])

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        if not self.has_turns[i]:
            return Document(int(self.doc_start[i]), int(self.doc_length[i]))
        lo, hi = np.searchsorted(self.turn_doc, [i, i + 1])
        return Document(int(self.doc_start[i]), int(self.doc_length[i]),
                        tuple(int(x) for x in self.turn_length[lo:hi]),
                        tuple(bool(x) for x in self.turn_is_context[lo:hi]))

    def __iter__(self) -> Iterator[Document]:
        return (self[i] for i in range(len(self)))

    @property
    def num_tokens(self) -> int:
        return int(self.doc_length.sum())

    @property
    def max_length(self) -> int:
        return int(self.doc_length.max()) if len(self) else 0


def documents_from_batch(doc_lengths, turn_lengths=None, turn_is_context=None) -> DocumentBatch:
    """Documents from packed lengths.

    doc_lengths: (D,) ints >= 1 in packed order. turn_lengths (U,) ints >= 1 and turn_is_context
    (U,) bools, if given, tile the documents in order (each document's turns sum to its length).
    Raises ValueError naming the offending value.
    """
    lengths = np.asarray(doc_lengths, dtype=np.int64).reshape(-1)
    if lengths.size and lengths.min() < 1:
        bad = int(np.flatnonzero(lengths < 1)[0])
        raise ValueError(f"document {bad} has length {int(lengths[bad])}; lengths must be >= 1")
    if (turn_lengths is None) != (turn_is_context is None):
        raise ValueError("turn_lengths and turn_is_context come together")
    d = lengths.shape[0]
    if turn_lengths is None:
        return DocumentBatch(lengths, lengths.copy(), np.arange(d, dtype=np.int64),
                             np.zeros(d, dtype=bool), np.zeros(d, dtype=bool))
    turns = np.asarray(turn_lengths, dtype=np.int64).reshape(-1)
    context = np.asarray(turn_is_context, dtype=bool).reshape(-1)
    if turns.shape != context.shape:
        raise ValueError(f"turn_lengths {turns.shape} and turn_is_context {context.shape} differ")
    if turns.size and turns.min() < 1:
        bad = int(np.flatnonzero(turns < 1)[0])
        raise ValueError(f"turn {bad} has length {int(turns[bad])}; turn lengths must be >= 1")
    doc_ends = np.cumsum(lengths)
    turn_ends = np.cumsum(turns)
    if doc_ends.size != 0 and (turn_ends.size == 0 or turn_ends[-1] != doc_ends[-1]
                               or not np.isin(doc_ends, turn_ends).all()):
        raise ValueError("turns must tile the documents exactly (every document end is a turn end)")
    turn_doc = np.searchsorted(doc_ends, turn_ends - 1, side="right").astype(np.int64)
    return DocumentBatch(lengths, turns, turn_doc, context, np.ones(d, dtype=bool))


def as_document_batch(docs: DocumentBatch | Sequence[Document]) -> DocumentBatch:
    """Accept a DocumentBatch or a list of Documents (which must lie back to back from 0)."""
    if isinstance(docs, DocumentBatch):
        return docs
    lengths, turns, context = [], [], []
    position = 0
    for i, doc in enumerate(docs):
        if doc.start != position:
            raise ValueError(f"document {i} starts at {doc.start}, expected {position}: "
                             "documents lie back to back from token 0")
        position += doc.length
        lengths.append(doc.length)
        turns.extend(doc.turn_lengths if doc.turn_lengths is not None else (doc.length,))
        context.extend(doc.turn_is_context if doc.turn_is_context is not None else (False,))
    batch = documents_from_batch(lengths, turns, context)
    batch.has_turns = np.array([doc.turn_lengths is not None for doc in docs], dtype=bool)
    return batch


@dataclass(frozen=True)
class Segments:
    """Turns cut at worker boundaries; each row is one home CA-task (see the module docstring).

    All (N,) int64 except ``causal`` (N,) bool. ``home`` is the worker holding the queries.
    """

    doc: np.ndarray
    home: np.ndarray
    q_start: np.ndarray
    q_end: np.ndarray
    kv_start: np.ndarray
    kv_end: np.ndarray
    causal: np.ndarray

    def __len__(self) -> int:
        return int(self.doc.shape[0])

    def pairs(self) -> np.ndarray:
        """(N,) int64 score pairs of each segment's task."""
        return task_pairs(self.q_end - self.q_start, self.kv_end - self.kv_start, self.causal)


def task_pairs(q_len, kv_len, causal) -> np.ndarray:
    """Score pairs of CA-tasks: full ``|q||kv|``; causal (bottom-right aligned) ``r|kv| - r(r-1)/2``
    with ``r = min(|q|, |kv|)``.

    Bottom-right alignment: query row ``i`` (0-based) sees ``max(0, min(|kv|, |kv| - |q| + i + 1))``
    keys, so when ``|q| > |kv|`` the first ``|q| - |kv|`` rows see nothing and the rest form a
    ``|kv|``-row triangle. Arrays broadcast; int64 in, int64 out.
    """
    q = np.asarray(q_len, dtype=np.int64)
    kv = np.asarray(kv_len, dtype=np.int64)
    r = np.minimum(q, kv)
    return np.where(causal, r * kv - r * (r - 1) // 2, q * kv)


def build_segments(docs: DocumentBatch, tokens_per_worker: int) -> Segments:
    """Cut every turn at worker boundaries, vectorised over turns."""
    t = tokens_per_worker
    ts = docs.turn_start
    te = ts + docs.turn_length
    first = ts // t
    count = (te - 1) // t - first + 1
    turn = np.repeat(np.arange(ts.shape[0]), count)
    offset = np.arange(turn.shape[0]) - np.repeat(np.cumsum(count) - count, count)
    home = first[turn] + offset
    q_start = np.maximum(ts[turn], home * t)
    q_end = np.minimum(te[turn], (home + 1) * t)
    causal = ~docs.turn_is_context[turn]
    doc = docs.turn_doc[turn]
    kv_end = np.where(causal, q_end, te[turn])
    return Segments(doc, home, q_start, q_end, docs.doc_start[doc], kv_end, causal)
