"""Step-time simulator: predicted training step time of distca against the baselines (design §4).

The cluster is ``dp × pp × tp`` GPUs (:class:`Cluster`); a step is ``M = micro_batches``
micro-batches of ``T`` tokens per data-parallel replica, i.e. ``dp × M × T`` tokens of sampled
documents. Every system is charged by one cost model (:mod:`distca.scheduler.sim_model`: linear
time ∝ tokens, attention time ∝ score pairs at a shape-dependent or measured rate, bytes over
NVLink or the network) and played through its pipeline schedule as an event simulation
(:mod:`distca.scheduler.pipeline_sim`), so pipeline stalls on heavy micro-batches come from the
critical path, not from a constant bubble factor. Systems (:data:`SYSTEMS`):

* ``packing``, ``varlen``, ``per-doc-cp``, ``wlb-llm``: colocated attention under 1F1B
  (:mod:`distca.scheduler.baselines`); the CP systems take the fastest group size among the
  candidates ``cp``, as their user would tune it;
* ``distca``: plain packing for the linear layers, lock-step ticks, each tick's forward attention
  planned over all ranks (bubble ranks included) as the runtime does it; ``distca-tick``: the
  same with all attention in flight at a tick re-balanced against each rank's linear work, the
  backwards' inputs shipped again; ``distca-job``: the runtime with one plan per job (stage,
  micro-batch) instead of per tick (:mod:`distca.scheduler.distca_sim`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from distca.scheduler.baselines import cp_seconds, packing_seconds, varlen_seconds
from distca.scheduler.distca_sim import distca_seconds
from distca.scheduler.distributions import sample_lengths
from distca.scheduler.sim_model import Cluster, Hardware, ModelSpec, attention_seconds

__all__ = ["SYSTEMS", "Cluster", "Hardware", "ModelSpec", "StepTimes", "attention_seconds",
           "simulate", "simulate_batch"]

SYSTEMS = ("packing", "varlen", "per-doc-cp", "wlb-llm", "distca", "distca-tick",
           "distca-job")


@dataclass(frozen=True)
class StepTimes:
    """Predicted seconds per step for each system on one batch."""

    seconds: dict[str, float]
    imbalance: float  # distca: the worst tick plan's max/mean attention cost
    # distca under the runtime's plans: mean max/mean attention over the ranks in the ticks of
    # forwards only and in the ticks with a backward (which runs where its forward was planned)
    tick_imbalance: dict[str, float]
    bytes_moved: int  # distca: forward dispatch bytes per layer, summed over the tick plans
    cp_size: int = 1  # replicas per CP group that WLB-LLM found fastest


def simulate_batch(lengths: np.ndarray, model: ModelSpec, cluster: Cluster, hw: Hardware,
                   tokens_per_worker: int, tolerance: float = 0.1, ping_pong: bool = True,
                   cp: int | tuple[int, ...] = (1, 2, 4, 8), slack: float = 0.25,
                   min_shard_tokens: int = 128) -> StepTimes:
    """Predicted step seconds of every system for one step's documents ``lengths`` (D,) filling
    ``dp × M × T`` tokens.

    cp: replicas per CP group, or candidates of which the fastest counts (each lowered to the
    largest divisor of ``dp`` not above it). slack: the token cap of whole-document packers is
    ``(1 + slack)`` times the tokens distca and packing hold per micro-batch slice (memory)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    t, dp = tokens_per_worker, cluster.dp
    if lengths.sum() > dp * cluster.micro_batches * t:
        raise ValueError(f"{lengths.sum()} tokens do not fit dp={dp} × micro_batches="
                         f"{cluster.micro_batches} × {t} tokens")
    seconds = {"packing": packing_seconds(lengths, model, cluster, hw, t),
               "varlen": varlen_seconds(lengths, model, cluster, hw, t, slack)}
    sizes = {max(d for d in range(1, min(int(c), dp) + 1) if dp % d == 0)
             for c in np.atleast_1d(cp)}
    for name, balanced in (("per-doc-cp", False), ("wlb-llm", True)):
        times = {size: cp_seconds(lengths, model, cluster, hw, t, size, balanced, slack)
                 for size in sizes}
        best = min(times, key=times.get)
        seconds[name] = times[best]
        cp_size = best  # the last one: WLB-LLM's
    distca, imbalance, moved = distca_seconds(lengths, model, cluster, hw, t, tolerance, ping_pong,
                                          min_shard_tokens)
    seconds["distca"], seconds["distca-tick"] = distca["runtime"], distca["tick"]
    seconds["distca-job"] = distca["job"]
    ticks = {k: imbalance[k] for k in ("forward", "backward")}
    return StepTimes(seconds, imbalance["plans"], ticks, moved, int(cp_size))


def simulate(distribution, model: ModelSpec, cluster: Cluster, hw: Hardware, max_len: int,
             batches: int, tokens_per_worker: int | None = None, seed: int = 0,
             **kwargs) -> dict[str, float]:
    """Mean predicted step seconds per system over ``batches`` sampled steps."""
    t = tokens_per_worker or max_len
    rng = np.random.default_rng(seed)
    totals = dict.fromkeys(SYSTEMS, 0.0)
    for _ in range(batches):
        lengths = sample_lengths(rng, distribution, cluster.dp * cluster.micro_batches * t,
                                 max_len)
        step = simulate_batch(lengths, model, cluster, hw, t, **kwargs)
        for name, value in step.seconds.items():
            totals[name] += value / batches
    return totals
