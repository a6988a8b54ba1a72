"""Step-time simulator: predicted training step time of distca against three baselines (design §4).

The cluster is ``dp × pp × tp`` GPUs; each data-parallel replica (tp·pp GPUs) holds ``T`` tokens
of one packed micro-batch for its linear layers. Per layer a replica spends

* linear time: tokens × linear FLOPs per token / (tp GPUs at ``linear_mfu`` of peak);
* attention time: score pairs × FLOPs per pair / (tp GPUs at attention throughput), where a task
  shorter than ``min_efficient_shard`` query tokens runs proportionally slower (flash attention
  saturates at ~128 tokens), or at the rate a measured CostTable gives;
* communication: bytes over NVLink inside a node, over the network across nodes.

A step is the slowest replica's sum over its ``num_layers / pp`` layers, times the pipeline bubble
``(M + pp - 1) / M`` (the same for every system, so pipeline parallelism changes no ratio here).
Systems:

* ``packing``: colocated attention, documents packed in order into the replicas;
* ``varlen``: variable-length packing: whole documents go to the replica with the least predicted
  time (longest first), token counts free to differ by up to ``varlen_slack``;
* ``per-doc-cp``: WLB-LLM-like: whole documents packed (varlen) into groups of ``cp`` replicas;
  inside a group every document is cut into ``2·cp`` chunks and replica ``r`` holds chunks
  ``r`` and ``2·cp-1-r`` (head/tail), charged with the same shape-dependent attention cost as
  every other system (tiny chunks of short documents run slowly), a ring all-gather of the
  group's k/v (forward) and reduce-scatter of dk/dv (backward), and the real per-replica
  imbalance that uneven chunks leave; with several candidate ``cp`` the fastest is taken;
* ``distca``: packing for the linear layers and the planner for attention; its dispatch overlaps
  compute with ping-pong (``max``) or adds to it (sum) without.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from distca.scheduler.cost import CostTable, ModelShape, attention_flops_per_pair
from distca.scheduler.distributions import sample_lengths
from distca.scheduler.documents import build_segments, documents_from_batch
from distca.scheduler.planner import plan_step

SYSTEMS = ("packing", "varlen", "per-doc-cp", "distca")


@dataclass(frozen=True)
class ModelSpec:
    """Transformer shape (Llama family): layers, hidden, query/kv heads, ffn width."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    bytes_per_elem: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def shape(self) -> ModelShape:
        return ModelShape(self.num_heads, self.num_kv_heads, self.head_dim, self.bytes_per_elem)

    @property
    def linear_flops_per_token(self) -> float:
        """Forward + backward FLOPs of one layer's linear parts per token (3 × 2 × params)."""
        d, h = self.head_dim, self.hidden_size
        params = h * d * (self.num_heads * 2 + self.num_kv_heads * 2) + 3 * h * self.ffn_hidden_size
        return 6.0 * params

    @property
    def attention_flops_per_pair(self) -> float:
        return attention_flops_per_pair(self.num_heads, self.head_dim)


@dataclass(frozen=True)
class Cluster:
    gpus: int
    tp: int = 8
    pp: int = 1
    gpus_per_node: int = 8
    micro_batches: int = 8  # per step and replica, for the pipeline bubble

    def __post_init__(self) -> None:
        if self.gpus < 1 or self.tp < 1 or self.pp < 1 or self.gpus % (self.tp * self.pp):
            raise ValueError(f"{self.gpus} GPUs do not split into tp={self.tp} × pp={self.pp}")

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)


@dataclass(frozen=True)
class Hardware:
    """H200-class defaults: bf16 peak, achieved fractions, link bandwidth per GPU (bytes/s)."""

    peak_flops: float = 989e12
    linear_mfu: float = 0.55
    attention_mfu: float = 0.45
    min_efficient_shard: int = 128
    nvlink_bytes_per_s: float = 450e9
    network_bytes_per_s: float = 50e9
    cost_table: CostTable | None = None  # measured pairs/s per GPU by task shape


@dataclass(frozen=True)
class StepTimes:
    """Predicted seconds per step for each system on one batch."""

    seconds: dict[str, float]
    imbalance: float  # distca planner's max/mean attention cost
    bytes_moved: int  # distca planner's forward dispatch bytes per layer
    cp_size: int = 1  # replicas per group of the fastest per-document CP candidate


def attention_seconds(pairs, q_len, kv_len, model: ModelSpec, cluster: Cluster,
                      hw: Hardware) -> np.ndarray:
    """Seconds per layer of tasks with these pairs and shapes on one replica (tp GPUs)."""
    pairs = np.asarray(pairs, dtype=np.float64)
    flops = pairs * model.attention_flops_per_pair
    if hw.cost_table is not None:
        rate = hw.cost_table.throughput(q_len, kv_len) * model.attention_flops_per_pair
    else:
        efficiency = np.minimum(1.0, np.asarray(q_len, dtype=np.float64) / hw.min_efficient_shard)
        rate = hw.peak_flops * hw.attention_mfu * efficiency
    return flops / (rate * cluster.tp)


def simulate_batch(lengths: np.ndarray, model: ModelSpec, cluster: Cluster, hw: Hardware,
                   tokens_per_worker: int, tolerance: float = 0.1, ping_pong: bool = True,
                   cp: int | tuple[int, ...] = 8, varlen_slack: float = 0.25) -> StepTimes:
    """Predicted step seconds of every system for one batch of ``dp × T`` tokens.

    cp: replicas per per-document CP group, or candidates of which the fastest counts (each
    lowered to the largest divisor of ``dp`` not above it)."""
    w, t = cluster.dp, tokens_per_worker
    layers = model.num_layers / cluster.pp
    bubble = (cluster.micro_batches + cluster.pp - 1) / cluster.micro_batches
    linear_per_token = model.linear_flops_per_token / (hw.peak_flops * hw.linear_mfu * cluster.tp)
    docs = documents_from_batch(lengths)
    seg = build_segments(docs, t)
    seg_time = attention_seconds(seg.pairs(), seg.q_end - seg.q_start,
                                 seg.kv_end - seg.kv_start, model, cluster, hw)
    packed = np.bincount(seg.home, weights=seg_time, minlength=w) + t * linear_per_token
    seconds = {"packing": float(packed.max())}

    doc_pairs = lengths * (lengths + 1) // 2
    doc_time = attention_seconds(doc_pairs, lengths, lengths, model, cluster, hw)
    seconds["varlen"] = _varlen(lengths, doc_time, w, t, linear_per_token, varlen_slack)

    sizes = {max(d for d in range(1, min(int(c), w) + 1) if w % d == 0) for c in np.atleast_1d(cp)}
    cp_times = {size: per_doc_cp_seconds(lengths, doc_time, model, cluster, hw, t, size,
                                         linear_per_token, varlen_slack) for size in sizes}
    cp_size = min(cp_times, key=cp_times.get)
    seconds["per-doc-cp"] = cp_times[cp_size]

    plan = plan_step(docs, w, t, tolerance=tolerance, model=model.shape,
                     cost_table=hw.cost_table)
    tasks = plan.tasks
    task_time = attention_seconds(
        np.array([0]) if tasks.size == 0 else _pairs(tasks), tasks["q_end"] - tasks["q_start"],
        tasks["kv_end"] - tasks["kv_start"], model, cluster, hw)
    compute = np.bincount(tasks["server"], weights=task_time, minlength=w)
    comm = _dispatch_seconds(plan, cluster, hw)
    attention = np.maximum(compute, comm) if ping_pong else compute + comm
    seconds["distca"] = float((attention + t * linear_per_token).max())
    seconds = {k: v * layers * bubble for k, v in seconds.items()}
    return StepTimes(seconds, plan.imbalance, plan.bytes_moved, int(cp_size))


def per_doc_cp_seconds(lengths, doc_time, model: ModelSpec, cluster: Cluster, hw: Hardware,
                       tokens_per_worker: int, cp: int, linear_per_token: float,
                       slack: float = 0.25) -> float:
    """Seconds per layer of per-document CP with groups of ``cp`` replicas: the slowest replica.

    lengths (D,) int document lengths; doc_time (D,) predicted seconds of each whole document
    (the packer's priority). A document of length L is cut at ``floor(j·L / 2cp)``; chunk j
    attends causally to the document's first ``end_j`` tokens, so its cost has the shape
    (chunk length, end_j) that :func:`attention_seconds` prices like any CA-task.
    """
    w = cluster.dp
    if cp < 1 or w % cp:
        raise ValueError(f"per-document CP group of {cp} replicas does not divide dp={w}")
    lengths = np.asarray(lengths, dtype=np.int64)
    group, _ = _pack_documents(lengths, doc_time, w // cp, tokens_per_worker * cp,
                               linear_per_token, slack)
    chunks = 2 * cp
    ends = lengths[:, None] * np.arange(1, chunks + 1) // chunks  # (D, 2cp)
    q = np.diff(ends, axis=1, prepend=0)
    pairs = q * ends - q * (q - 1) // 2
    busy = pairs > 0
    chunk_time = np.zeros(q.shape)
    chunk_time[busy] = attention_seconds(pairs[busy], q[busy], ends[busy], model, cluster, hw)
    rank = np.arange(cp)
    mirror = chunks - 1 - rank
    attn = chunk_time[:, rank] + chunk_time[:, mirror]  # (D, cp): replica r's head and tail
    tokens = q[:, rank] + q[:, mirror]
    replica = group[:, None] * cp + rank  # (D, cp)
    busy_s = np.bincount(replica.ravel(), weights=(attn + tokens * linear_per_token).ravel(),
                         minlength=w)
    # ring all-gather of the group's k/v forward, reduce-scatter of dk/dv backward: each replica
    # moves (cp-1)/cp of the group's k/v bytes each way, spread over its tp GPUs' links
    group_tokens = np.bincount(group, weights=lengths, minlength=w // cp)
    moved = 2 * group_tokens * model.shape.kv_bytes * (cp - 1) / cp
    comm = moved / (cluster.tp * _bandwidth(hw, cluster, cp))
    return float((busy_s + np.repeat(comm, cp)).max())


def simulate(distribution, model: ModelSpec, cluster: Cluster, hw: Hardware, max_len: int,
             batches: int, tokens_per_worker: int | None = None, seed: int = 0,
             **kwargs) -> dict[str, float]:
    """Mean predicted step seconds per system over ``batches`` sampled batches."""
    t = tokens_per_worker or max_len
    rng = np.random.default_rng(seed)
    totals = dict.fromkeys(SYSTEMS, 0.0)
    for _ in range(batches):
        lengths = sample_lengths(rng, distribution, cluster.dp * t, max_len)
        step = simulate_batch(lengths, model, cluster, hw, t, **kwargs)
        for name, value in step.seconds.items():
            totals[name] += value / batches
    return totals


def _pairs(tasks: np.ndarray) -> np.ndarray:
    q, kv = tasks["q_end"] - tasks["q_start"], tasks["kv_end"] - tasks["kv_start"]
    return q * kv - np.where(tasks["causal"], q * (q - 1) // 2, 0)


def _bandwidth(hw: Hardware, cluster: Cluster, replicas: int) -> float:
    """Link bandwidth of a group of replicas: NVLink if it fits in one node."""
    in_node = replicas * cluster.tp * cluster.pp <= cluster.gpus_per_node
    return hw.nvlink_bytes_per_s if in_node else hw.network_bytes_per_s


def _dispatch_seconds(plan, cluster: Cluster, hw: Hardware) -> np.ndarray:
    """(W,) seconds per layer each replica spends in dispatch: forward bytes plus the backward
    (dO out, dq and dk/dv back: about twice forward), the busier of send and receive, spread
    over its tp GPUs' links."""
    moves = plan.transfers()
    per_node = max(1, cluster.gpus_per_node // (cluster.tp * cluster.pp))
    length = (moves["end"] - moves["start"]).astype(np.float64)
    m = plan.model
    q_in = m.h_q * m.head_dim * m.bytes_per_elem
    into_dst = np.where(moves["is_kv"], m.kv_bytes, q_in) * length
    back_to_src = np.where(moves["is_kv"], 0, m.q_bytes - q_in) * length
    same_node = moves["src"] // per_node == moves["dst"] // per_node
    bw = np.where(same_node, hw.nvlink_bytes_per_s, hw.network_bytes_per_s) * cluster.tp
    w = plan.num_servers
    received = np.bincount(moves["dst"], weights=into_dst / bw, minlength=w) + \
        np.bincount(moves["src"], weights=back_to_src / bw, minlength=w)
    sent = np.bincount(moves["src"], weights=into_dst / bw, minlength=w) + \
        np.bincount(moves["dst"], weights=back_to_src / bw, minlength=w)
    return 3 * np.maximum(received, sent)


def _pack_documents(lengths, doc_time, bins, capacity, linear_per_token, slack):
    """Longest-processing-time packing of whole documents into ``bins`` of ``capacity`` tokens
    (plus ``slack``): ((D,) bin of each document, (bins,) predicted seconds of each bin)."""
    order = np.lexsort((np.arange(lengths.size), -doc_time))
    load = np.zeros(bins)
    tokens = np.zeros(bins)
    where = np.zeros(lengths.size, dtype=np.int64)
    limit = capacity * (1 + slack)
    for i in order:
        fits = tokens + lengths[i] <= limit
        b = int(np.argmin(np.where(fits, load, np.inf))) if fits.any() else int(np.argmin(tokens))
        load[b] += doc_time[i] + lengths[i] * linear_per_token
        tokens[b] += lengths[i]
        where[i] = b
    return where, load


def _varlen(lengths, doc_time, bins, capacity, linear_per_token, slack) -> float:
    return float(_pack_documents(lengths, doc_time, bins, capacity, linear_per_token,
                                 slack)[1].max())
