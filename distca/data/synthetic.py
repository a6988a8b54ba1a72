"""Synthetic documents with learnable structure, lengths from a distribution (for benchmarks
and the CPU default).

Each document is a modular random walk over the vocabulary: it starts at a random token and
every next token adds ``stride * step``, with ``stride`` fixed per document (1, 2 or 3) and
``step`` drawn from a skewed distribution over 1..8. A model can learn the step distribution
from bigrams and infer the document's stride from its context, so loss falls well below
``log(vocab)`` and attention matters. Generation is vectorised (one cumulative sum).
"""

from __future__ import annotations

import numpy as np

from distca.batch import PackedBatch
from distca.data.lengths import LengthSampler
from distca.data.packing import labels_for

_STEPS = np.arange(1, 9)
_STEP_PROBS = 1.0 / _STEPS**1.5 / np.sum(1.0 / _STEPS**1.5)
_STRIDES = np.array([1, 2, 3])


def random_walk_tokens(rng: np.random.Generator, doc_lengths: np.ndarray,
                       vocab_size: int) -> np.ndarray:
    """(sum(doc_lengths),) int64 token ids in ``[0, vocab_size)``, documents back to back."""
    n = int(doc_lengths.sum())
    starts = np.cumsum(doc_lengths) - doc_lengths
    stride = np.repeat(rng.choice(_STRIDES, size=doc_lengths.size), doc_lengths)
    increments = stride * rng.choice(_STEPS, size=n, p=_STEP_PROBS)
    increments[starts] = rng.integers(0, vocab_size, size=doc_lengths.size)
    walk = np.cumsum(increments)
    before = np.repeat(walk[starts] - increments[starts], doc_lengths)
    return (walk - before) % vocab_size


class SyntheticData:
    """Micro-batch ``g`` is a pure function of ``(seed, g)``: resume needs only the position."""

    def __init__(self, distribution: str, max_length: int, vocab_size: int, seed: int):
        self.lengths = LengthSampler(distribution, max_length)
        self.vocab_size = vocab_size
        self.seed = seed

    def micro_batch(self, index: int, num_ranks: int, tokens_per_rank: int) -> PackedBatch:
        rng = np.random.default_rng([self.seed, index])
        total = num_ranks * tokens_per_rank
        doc_lengths = self.lengths.fill(rng, total)
        tokens = random_walk_tokens(rng, doc_lengths, self.vocab_size)
        return PackedBatch(tokens=tokens, labels=labels_for(tokens, doc_lengths, total),
                           doc_lengths=doc_lengths, tokens_per_rank=tokens_per_rank)
