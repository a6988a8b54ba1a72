"""The unit of work the data pipeline hands the runtime: one packed micro-batch.

All data-parallel ranks' tokens of one micro-batch are packed into one stream. Rank ``r`` holds
the linear-layer tokens ``[r*T, (r+1)*T)`` (``T = tokens_per_rank``); a document may span ranks.
Documents are laid out back to back from token 0; tokens after the last document are padding
(no attention task, no loss). For FocuSFT, each document is cut into *turns* (design §2): a
maximal run of tokens with the same loss-mask value; context turns are bidirectional within the
turn, response turns causal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distca.scheduler import DocumentBatch, documents_from_batch

IGNORE = -100  # the label of a token that carries no loss


@dataclass
class PackedBatch:
    tokens: np.ndarray  # (R*T,) int64 token ids
    labels: np.ndarray  # (R*T,) int64 next-token targets; -100 where no loss
    doc_lengths: np.ndarray  # (D,) int64, >= 1, packed order; sum <= R*T
    tokens_per_rank: int  # T
    # FocuSFT only: turns of all documents in order; each document's turns sum to its length.
    turn_lengths: np.ndarray | None = None  # (U,) int64, >= 1
    turn_is_context: np.ndarray | None = None  # (U,) bool; True = bidirectional context turn

    def __post_init__(self) -> None:
        n = self.tokens.shape[0]
        if self.tokens.ndim != 1 or self.labels.shape != self.tokens.shape:
            raise ValueError(f"tokens and labels must be equal 1-D arrays, got "
                             f"{self.tokens.shape} and {self.labels.shape}")
        if self.tokens_per_rank < 1 or n % self.tokens_per_rank:
            raise ValueError(f"{n} tokens do not split into ranks of {self.tokens_per_rank}")
        if self.doc_lengths.size and (self.doc_lengths.min() < 1 or self.doc_lengths.sum() > n):
            raise ValueError("document lengths must be >= 1 and sum to at most the token count")
        if (self.turn_lengths is None) != (self.turn_is_context is None):
            raise ValueError("turn_lengths and turn_is_context come together")
        if self.turn_lengths is not None:
            if self.turn_lengths.shape != self.turn_is_context.shape:
                raise ValueError("turn_lengths and turn_is_context must have the same shape")
            if self.turn_lengths.size and self.turn_lengths.min() < 1:
                raise ValueError("turn lengths must be >= 1")
            doc_ends = np.cumsum(self.doc_lengths)
            turn_ends = np.cumsum(self.turn_lengths)
            if turn_ends.size and (turn_ends[-1] != doc_ends[-1]
                                   or not np.isin(doc_ends, turn_ends).all()):
                raise ValueError("turns must tile the documents exactly")

    @property
    def num_ranks(self) -> int:
        return self.tokens.shape[0] // self.tokens_per_rank

    def documents(self) -> DocumentBatch:
        """The micro-batch's documents (and turns) as the planner reads them."""
        return documents_from_batch(self.doc_lengths, self.turn_lengths, self.turn_is_context)

    def position_ids(self) -> np.ndarray:
        """(R*T,) int64: each token's logical position inside its document (padding: 0)."""
        n = self.tokens.shape[0]
        pos = np.zeros(n, dtype=np.int64)
        used = int(self.doc_lengths.sum())
        starts = np.repeat(np.cumsum(self.doc_lengths) - self.doc_lengths, self.doc_lengths)
        pos[:used] = np.arange(used) - starts
        return pos

    def rank_slice(self, rank: int) -> slice:
        return slice(rank * self.tokens_per_rank, (rank + 1) * self.tokens_per_rank)


def loss_token_count(micro_batches: list[PackedBatch]) -> int:
    """Loss-bearing tokens of a step's micro-batches, over all ranks."""
    return int(sum((b.labels != IGNORE).sum() for b in micro_batches))
