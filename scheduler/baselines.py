"""Colocated baselines as their users run them, each played through the 1F1B pipeline.

Every data-parallel replica (or CP group) is one pipeline of ``pp`` stages running
``micro_batches`` micro-batches per step; the cost of micro-batch ``m`` on a stage is its
``num_layers / pp`` layers' linear time (∝ tokens) and attention time (∝ the score pairs of its
own documents), split into forward and backward (:mod:`distca.scheduler.sim_model`). Systems:

* ``packing``: the document stream packed in order into micro-batch slices of ``T`` tokens;
* ``varlen``: whole documents packed into the ``dp × M`` micro-batches by predicted cost
  (longest-processing-time first) under a token cap of ``T·(1+slack)``;
* ``per-doc-cp``: per-document context parallelism in groups of ``cp`` replicas with documents
  packed first-fit in arrival order into micro-batches of ``cp·T`` tokens;
* ``wlb-llm`` (WLB-LLM, OSDI '25): the same per-document CP, with whole documents packed by
  predicted cost (attention + linear) under the memory cap ``cp·T·(1+slack)`` so that
  micro-batches carry equal work. Its outlier delay (moving very long documents to a later step)
  is not modelled: one step is simulated at a time.

Per-document CP cuts a document of length L at ``floor(j·L / 2cp)``; CP rank ``r`` holds chunks
``r`` and ``2cp-1-r`` (head/tail), each priced as a CA-task of shape (chunk, end of chunk), plus a
ring all-gather of the micro-batch's k/v (forward) and reduce-scatter of dk/dv (backward); the CP
ranks meet in every layer, so a micro-batch's stage time is its slowest CP rank's.
"""

from __future__ import annotations

import numpy as np
from distca.scheduler.documents import build_segments, documents_from_batch
from distca.scheduler.pipeline_sim import pipeline_seconds
from distca.scheduler.sim_model import (
    FWD_ATTENTION,
    FWD_LINEAR,
    Cluster,
    Hardware,
    ModelSpec,
    attention_seconds,
    group_bandwidth,
    linear_seconds_per_token,
    micro_batch_streams,
)


def colocated_step(linear: np.ndarray, attention: np.ndarray, comm: np.ndarray, model: ModelSpec,
                   cluster: Cluster, hw: Hardware) -> float:
    """Step seconds of pipelines whose micro-batch ``m`` on pipeline ``r`` costs, per layer and
    summed over its ranks' slowest (forward + backward): ``linear``, ``attention`` (R, M) or
    (R, M, cp) per CP rank, and ``comm`` (R, M) collective seconds every CP rank pays."""
    linear, attention = np.atleast_3d(linear), np.atleast_3d(attention)
    layers = model.num_layers / cluster.pp
    fwd = (linear * FWD_LINEAR + attention * FWD_ATTENTION).max(axis=2) + comm / 2
    bwd = (linear * (1 - FWD_LINEAR) + attention * (1 - FWD_ATTENTION)).max(axis=2) + comm / 2
    stages = (1, cluster.pp, 1)
    return pipeline_seconds(np.tile(fwd[:, None, :] * layers, stages),
                            np.tile(bwd[:, None, :] * layers, stages), hw.cores, hw.others)


def packing_seconds(lengths: np.ndarray, model: ModelSpec, cluster: Cluster, hw: Hardware,
                    tokens_per_worker: int) -> float:
    """Step seconds of plain packing: micro-batch ``m`` is tokens ``[m·dp·T, (m+1)·dp·T)`` of
    the stream and replica ``d`` holds its ``d``-th slice of ``T`` tokens."""
    dp, t = cluster.dp, tokens_per_worker
    attention = np.zeros((dp, cluster.micro_batches))
    for m, piece in enumerate(micro_batch_streams(lengths, cluster.micro_batches, dp * t)):
        seg = build_segments(documents_from_batch(piece), t)
        seconds = attention_seconds(seg.pairs(), seg.q_end - seg.q_start,
                                    seg.kv_end - seg.kv_start, model, cluster, hw)
        attention[:, m] = np.bincount(seg.home, weights=seconds, minlength=dp)
    linear = np.full_like(attention, t * linear_seconds_per_token(model, cluster, hw))
    return colocated_step(linear, attention, np.zeros_like(attention), model, cluster, hw)


def document_seconds(lengths: np.ndarray, model: ModelSpec, cluster: Cluster,
                     hw: Hardware) -> np.ndarray:
    """(D,) forward + backward attention seconds per layer of each whole causal document."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return attention_seconds(lengths * (lengths + 1) // 2, lengths, lengths, model, cluster, hw)


def varlen_seconds(lengths: np.ndarray, model: ModelSpec, cluster: Cluster, hw: Hardware,
                   tokens_per_worker: int, slack: float) -> float:
    """Step seconds of variable-length packing without CP (bin ``b = m·dp + d``)."""
    dp, micro = cluster.dp, cluster.micro_batches
    doc_time = document_seconds(lengths, model, cluster, hw)
    per_token = linear_seconds_per_token(model, cluster, hw)
    bins = pack_balanced(lengths, doc_time + lengths * per_token, dp * micro,
                         tokens_per_worker * (1 + slack))
    tokens = np.bincount(bins, weights=lengths, minlength=dp * micro).reshape(micro, dp).T
    attention = np.bincount(bins, weights=doc_time, minlength=dp * micro).reshape(micro, dp).T
    return colocated_step(tokens * per_token, attention, np.zeros_like(attention), model,
                          cluster, hw)


def cp_seconds(lengths: np.ndarray, model: ModelSpec, cluster: Cluster, hw: Hardware,
               tokens_per_worker: int, cp: int, balanced: bool, slack: float) -> float:
    """Step seconds of per-document CP in groups of ``cp`` replicas: WLB-LLM's cost-balanced
    packing (``balanced``) or first-fit packing in arrival order (bin ``b = m·G + g``)."""
    dp, micro = cluster.dp, cluster.micro_batches
    if cp < 1 or dp % cp:
        raise ValueError(f"per-document CP group of {cp} replicas does not divide dp={dp}")
    groups = dp // cp
    capacity = tokens_per_worker * cp
    if balanced:
        cost = document_seconds(lengths, model, cluster, hw) + \
            lengths * linear_seconds_per_token(model, cluster, hw)
        bins = pack_balanced(lengths, cost, groups * micro, capacity * (1 + slack))
    else:
        bins = pack_first_fit(lengths, groups * micro, capacity * (1 + slack))
    linear, attention, comm = cp_rank_seconds(lengths, bins, groups * micro, model, cluster, hw,
                                              cp)
    # (bins, cp) -> (groups, micro, cp): bin b is micro-batch b // G of group b % G
    def per_group(x):
        return x.reshape(micro, groups, *x.shape[1:]).swapaxes(0, 1)

    return colocated_step(per_group(linear), per_group(attention), per_group(comm), model,
                          cluster, hw)


def cp_rank_seconds(lengths: np.ndarray, bins: np.ndarray, num_bins: int, model: ModelSpec,
                    cluster: Cluster, hw: Hardware, cp: int):
    """Per-layer forward + backward seconds of per-document CP, each document in micro-batch
    ``bins[i]``: linear (B, cp) and attention (B, cp) of every CP rank, and the ring collective
    (B,) each rank of the group pays."""
    lengths = np.asarray(lengths, dtype=np.int64)
    chunks = 2 * cp
    ends = lengths[:, None] * np.arange(1, chunks + 1) // chunks  # (D, 2cp)
    q = np.diff(ends, axis=1, prepend=0)
    pairs = q * ends - q * (q - 1) // 2
    busy = pairs > 0
    chunk_time = np.zeros(q.shape)
    chunk_time[busy] = attention_seconds(pairs[busy], q[busy], ends[busy], model, cluster, hw)
    rank = np.arange(cp)
    mirror = chunks - 1 - rank
    slot = (bins[:, None] * cp + rank).ravel()  # (D·cp,): the (bin, CP rank) holding the chunks
    attention = np.bincount(slot, weights=(chunk_time[:, rank] + chunk_time[:, mirror]).ravel(),
                            minlength=num_bins * cp).reshape(num_bins, cp)
    tokens = np.bincount(slot, weights=(q[:, rank] + q[:, mirror]).ravel(),
                         minlength=num_bins * cp).reshape(num_bins, cp)
    # each rank moves (cp-1)/cp of the micro-batch's k/v each way, over its tp GPUs' links
    moved = 2 * np.bincount(bins, weights=lengths, minlength=num_bins) * model.shape.kv_bytes \
        * (cp - 1) / cp
    comm = moved / (cluster.tp * group_bandwidth(hw, cluster, cp))
    return tokens * linear_seconds_per_token(model, cluster, hw), attention, comm


def pack_balanced(lengths: np.ndarray, cost: np.ndarray, bins: int, limit: float) -> np.ndarray:
    """Longest-processing-time packing of whole documents by ``cost`` (D,) into ``bins`` holding
    at most ``limit`` tokens each (a document that fits nowhere goes to the emptiest bin):
    (D,) bin of each document."""
    order = np.lexsort((np.arange(lengths.size), -cost))
    load, tokens = np.zeros(bins), np.zeros(bins)
    where = np.zeros(lengths.size, dtype=np.int64)
    for i in order:
        fits = tokens + lengths[i] <= limit
        b = int(np.argmin(np.where(fits, load, np.inf))) if fits.any() else int(np.argmin(tokens))
        load[b] += cost[i]
        tokens[b] += lengths[i]
        where[i] = b
    return where


def pack_first_fit(lengths: np.ndarray, bins: int, limit: float) -> np.ndarray:
    """Documents in arrival order, each into the first bin with room for it (or the emptiest):
    (D,) bin of each document."""
    tokens = np.zeros(bins)
    where = np.zeros(lengths.size, dtype=np.int64)
    for i, length in enumerate(lengths):
        fits = np.flatnonzero(tokens + length <= limit)
        b = int(fits[0]) if fits.size else int(np.argmin(tokens))
        tokens[b] += length
        where[i] = b
    return where
