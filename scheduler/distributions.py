"""Document-length distributions for synthetic batches and the simulator.

* ``pretrain``: a long tail of web-like documents (log-normal, median ~1K tokens) with long
  documents upsampled: 5% of documents are drawn log-uniformly from [max_len/8, max_len], the way
  long-context pretraining mixes upsample long sources.
* ``prolong``: a ProLong-like mix: about 60% of *tokens* from long documents (code repositories and
  books, drawn uniformly in [max_len/2, max_len]) and the rest short instruction/web data.
* a file: one integer per line, or a JSON list; batches resample its lengths.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

DISTRIBUTIONS = ("pretrain", "prolong")
# Score pairs are counted in int64: n tokens have at most n(n+1)/2 of them, so lengths (and
# batches) up to 2^31 tokens keep every count far below 2^63.
MAX_LENGTH = 1 << 31


def read_lengths(path: str | Path) -> np.ndarray:
    """(D,) int64 document lengths from a file: one integer per line, or a JSON list.

    Raises ValueError naming the file and the offending value.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such lengths file")
    try:
        text = path.read_text().strip()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a text file ({exc})") from None
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not a valid JSON list: {exc}") from exc
        where = [f"{path}: item {i}" for i in range(len(items))]
    else:
        items = [line.strip() for line in text.splitlines() if line.strip()]
        where = [f"{path}:{i + 1}" for i, line in enumerate(text.splitlines()) if line.strip()]
    if not items:
        raise ValueError(f"{path}: holds no lengths")
    return np.array([parse_length(item, at) for item, at in zip(items, where)], dtype=np.int64)


def parse_length(value, where: str) -> int:
    """One integer length in [1, MAX_LENGTH]; ValueError naming ``where`` and the value
    otherwise."""
    if isinstance(value, bool) or isinstance(value, float):
        raise ValueError(f"{where}: length {value!r} is not an integer")
    try:
        length = int(str(value).strip())
    except ValueError:
        raise ValueError(f"{where}: length {value!r} is not an integer") from None
    if not 1 <= length <= MAX_LENGTH:
        raise ValueError(f"{where}: length {length} must be in [1, {MAX_LENGTH}]")
    return length


def sample_lengths(rng: np.random.Generator, distribution: str | np.ndarray, tokens: int,
                   max_len: int) -> np.ndarray:
    """(D,) int64 lengths filling exactly ``tokens`` tokens, each in [1, max_len].

    distribution: "pretrain", "prolong", or an array of lengths to resample. The last document is
    cut to fit, as a packer truncates.
    """
    if max_len < 1 or tokens < 1:
        raise ValueError(f"need max_len >= 1 and tokens >= 1, got {max_len} and {tokens}")
    n = max(64, 2 * tokens // max(1, min(max_len, 1024)))
    return fill_budget(lambda: _draw(rng, distribution, n, max_len), tokens)


def fill_budget(draw: Callable[[], np.ndarray], tokens: int) -> np.ndarray:
    """(D,) int64 lengths from repeated ``draw()`` calls, summing to exactly ``tokens``.

    The last document is cut to fit (it keeps at least one token), as a packer truncates.
    """
    parts, total = [], 0
    while total < tokens:
        part = draw()
        parts.append(part)
        total += int(part.sum())
    lengths = np.concatenate(parts)
    ends = np.cumsum(lengths)
    count = int(np.searchsorted(ends, tokens)) + 1
    lengths = lengths[:count].copy()
    lengths[-1] -= int(ends[count - 1]) - tokens
    return lengths


def _draw(rng: np.random.Generator, distribution, n: int, max_len: int) -> np.ndarray:
    if isinstance(distribution, np.ndarray):
        return np.minimum(rng.choice(distribution, size=n), max_len)
    if distribution == "pretrain":
        short = np.exp(rng.normal(np.log(1024), 1.2, size=n))
        lo = np.log(max(1, max_len // 8))
        long = np.exp(rng.uniform(lo, np.log(max_len), size=n))
        lengths = np.where(rng.random(n) < 0.05, long, short)
    elif distribution == "prolong":
        # Long documents average ~0.75 max_len tokens; pick the document fraction that gives
        # ~60% of tokens from them next to ~1K-token short documents.
        mean_long, mean_short = 0.75 * max_len, 1500.0
        p_long = 0.6 * mean_short / (0.6 * mean_short + 0.4 * mean_long)
        long = rng.uniform(max_len / 2, max_len, size=n)
        short = np.exp(rng.normal(np.log(800), 1.0, size=n))
        lengths = np.where(rng.random(n) < p_long, long, short)
    else:
        raise ValueError(f"unknown distribution {distribution!r} (known: {DISTRIBUTIONS} "
                         "or a lengths file)")
    return np.clip(lengths.astype(np.int64), 1, max_len)
