"""Value checks of the config keys that memory prediction, recompute and sequence parallelism
add (kept out of :mod:`distca.config`, which calls :func:`memory_key_problem` from its
``validate``)."""

from __future__ import annotations

from typing import Any


def memory_key_problem(cfg: Any) -> tuple[str, str] | None:
    """(dotted key, message) of the first invalid memory-related value, or None."""
    gib = cfg.trainer.device_memory_gib
    if gib is not None and not gib > 0:
        return "trainer.device_memory_gib", f"must be > 0 (or null: no device check), got {gib}"
    p = cfg.parallel
    if p.sequence_parallel:
        if p.tp == 1:
            return "parallel.sequence_parallel", "needs parallel.tp > 1 (it shards over TP ranks)"
        if cfg.data.tokens_per_rank % p.tp:
            return ("parallel.sequence_parallel", f"data.tokens_per_rank="
                    f"{cfg.data.tokens_per_rank} is not divisible by parallel.tp={p.tp}")
    return None

