"""Document-length distributions for synthetic data.

``pretrain``: a pretraining-like long tail: most documents are short (log-normal body with a
median of ``max_length/64``), and long documents are upsampled (20% of documents uniform in
``[max_length/4, max_length]``), the way long-context continued pretraining mixes its data.
``prolong``: a ProLong-like mix: 40% long documents (books, code repositories) in
``[max_length/2, max_length]`` and 60% short ones (log-normal, median 512 tokens).
Anything else is a path to a file of lengths (one integer per line, or a JSON list), sampled
uniformly with replacement and clipped to ``max_length``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distca.scheduler.distributions import fill_budget, read_lengths

BUILT_IN = ("pretrain", "prolong")


def read_lengths_file(path: str | Path) -> np.ndarray:
    """(N,) int64 positive lengths from a file; errors name the file and the bad value."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"data.distribution: lengths file {path} does not exist")
    return read_lengths(path)


class LengthSampler:
    """Draws document lengths in ``[1, max_length]`` from one named distribution."""

    def __init__(self, distribution: str, max_length: int):
        self.max_length = max_length
        self.distribution = distribution
        self._table = None if distribution in BUILT_IN else read_lengths_file(distribution)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """(n,) int64 lengths."""
        m = self.max_length
        if self._table is not None:
            out = rng.choice(self._table, size=n)
        elif self.distribution == "pretrain":
            body = rng.lognormal(np.log(max(m / 64, 1.0)), 1.0, size=n)
            tail = rng.uniform(m / 4, m, size=n)
            out = np.where(rng.random(n) < 0.2, tail, body)
        else:
            body = rng.lognormal(np.log(min(512.0, m / 4)), 0.8, size=n)
            tail = rng.uniform(m / 2, m, size=n)
            out = np.where(rng.random(n) < 0.4, tail, body)
        return np.clip(np.rint(out), 1, m).astype(np.int64)

    def fill(self, rng: np.random.Generator, budget: int) -> np.ndarray:
        """Lengths summing to exactly ``budget``: the last document is cut to fit."""
        return fill_budget(lambda: self.sample(rng, 64), budget)
