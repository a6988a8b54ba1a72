"""The cost model every simulated system shares: model shape, cluster, hardware, attention time.

Units: seconds, bytes, FLOPs, tokens. Work of one layer is split into its forward and backward
parts by FLOPs (:data:`FWD_LINEAR`, :data:`FWD_ATTENTION`) because the pipeline schedules run
them as separate operations.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from distca.scheduler.cost import CostTable, ModelShape, attention_flops_per_pair

# Forward share of a layer's FLOPs: linear layers 2 of 6 FLOPs per parameter and token, attention
# 4 of 14 per score pair (the backward recomputes nothing and costs 2.5x the forward).
FWD_LINEAR = 1.0 / 3.0
FWD_ATTENTION = 2.0 / 7.0


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

    @classmethod
    def of(cls, model: Mapping | object, bytes_per_elem: int = 2) -> ModelSpec:
        """The one conversion from a model config (attributes) or preset (a mapping) with the
        config's names ``num_layers``, ``hidden_size``, ``num_attention_heads``,
        ``num_kv_heads``, ``ffn_hidden_size``, so no caller copies the fields by hand."""
        def field(name: str) -> int:
            return int(model[name] if isinstance(model, Mapping) else getattr(model, name))

        return cls(field("num_layers"), field("hidden_size"), field("num_attention_heads"),
                   field("num_kv_heads"), field("ffn_hidden_size"), bytes_per_elem)

    @property
    def shape(self) -> ModelShape:
        return self.shard_shape(1)

    def shard_shape(self, tp: int) -> ModelShape:
        """Attention shape of one of ``tp`` tensor-parallel ranks (heads split among them)."""
        return ModelShape(self.num_heads // tp, self.num_kv_heads // tp, self.head_dim,
                          self.bytes_per_elem)

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
    """``gpus = dp × pp × tp``; every data-parallel replica runs ``micro_batches`` micro-batches
    of ``T`` tokens per step through its ``pp`` stages."""

    gpus: int
    tp: int = 8
    pp: int = 1
    gpus_per_node: int = 8
    micro_batches: int = 1

    def __post_init__(self) -> None:
        if self.gpus < 1 or self.tp < 1 or self.pp < 1 or self.gpus % (self.tp * self.pp):
            raise ValueError(f"{self.gpus} GPUs do not split into tp={self.tp} × pp={self.pp}")
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {self.micro_batches}")

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    @property
    def ranks_per_node(self) -> int:
        """Model-parallel ranks (tp GPUs each) per node; rank ``s·dp + d`` is replica d's stage s."""
        return max(1, self.gpus_per_node // self.tp)


@dataclass(frozen=True)
class Hardware:
    """H200-class defaults: bf16 peak, achieved fractions, link bandwidth per GPU (bytes/s).

    ``cores``/``others``: processor sharing for calibration on a CPU (ranks share ``cores`` with
    ``others`` outside runnable threads, see :mod:`distca.scheduler.pipeline_sim`); None: every
    rank has its own device."""

    peak_flops: float = 989e12
    linear_mfu: float = 0.55
    attention_mfu: float = 0.45
    min_efficient_shard: int = 128
    nvlink_bytes_per_s: float = 450e9
    network_bytes_per_s: float = 50e9
    cost_table: CostTable | None = None  # measured pairs/s per GPU by task shape
    exchange_latency_s: float = 0.0  # per all-to-all beyond its bytes (α of an α-β model)
    # Processor seconds per layer (forward + backward) of disaggregated attention's bookkeeping
    # around the kernels, per token a rank handles: each token it sends as a worker (q/k/v packed,
    # partial outputs unpacked and merged, gradients scattered back) and each query token it
    # serves (inputs gathered, replies packed), plus the plans and layouts per tick, lumped
    # per token. 0 by default (cluster scale): on a GPU these are gather/scatter kernels over the
    # dispatched bytes at HBM bandwidth (~10x NVLink's, so under a tenth of the dispatch time the
    # model already charges) and the planner runs on the host (10-16 ms per tick of two 128K-512K
    # token jobs over 64 ranks measured on this CPU: ~0.2 s per pp=4 step, not charged, a few %
    # of the shortest table step);
    # on a CPU they compete with the kernels for the cores, and benchmarks/calibration.py
    # measures them from the runtime.
    dispatch_cpu_s_per_token: float = 0.0
    cores: float | None = None
    others: float = 0.0


def linear_seconds_per_token(model: ModelSpec, cluster: Cluster, hw: Hardware) -> float:
    """Forward + backward seconds of one layer's linear parts per token on one rank (tp GPUs)."""
    return model.linear_flops_per_token / (hw.peak_flops * hw.linear_mfu * cluster.tp)


def attention_seconds(pairs, q_len, kv_len, model: ModelSpec, cluster: Cluster,
                      hw: Hardware) -> np.ndarray:
    """Forward + backward seconds per layer of tasks with these pairs and shapes on one rank (tp
    GPUs); a task shorter than ``min_efficient_shard`` query tokens runs proportionally slower,
    or at the rate the cost table gives."""
    pairs = np.asarray(pairs, dtype=np.float64)
    flops = pairs * model.attention_flops_per_pair
    if hw.cost_table is not None:
        rate = hw.cost_table.throughput(q_len, kv_len) * model.attention_flops_per_pair
    else:
        efficiency = np.minimum(1.0, np.asarray(q_len, dtype=np.float64) / hw.min_efficient_shard)
        rate = hw.peak_flops * hw.attention_mfu * efficiency
    return flops / (rate * cluster.tp)


def group_bandwidth(hw: Hardware, cluster: Cluster, ranks: int) -> float:
    """Link bandwidth among ``ranks`` neighbouring ranks of one stage: NVLink if they fit a node."""
    return hw.nvlink_bytes_per_s if ranks * cluster.tp <= cluster.gpus_per_node \
        else hw.network_bytes_per_s


def micro_batch_streams(lengths: np.ndarray, parts: int, size: int) -> list[np.ndarray]:
    """The step's packed document stream (lengths, back to back) cut into ``parts`` micro-batches
    of ``size`` tokens; a document crossing a cut becomes two documents, as a packing data loader
    makes them. Returns one (D_m,) int64 array of document lengths per micro-batch."""
    ends = np.cumsum(np.asarray(lengths, dtype=np.int64))
    cuts = np.arange(1, parts) * size
    bounds = np.unique(np.concatenate([[0], ends, cuts[cuts < ends[-1]]]))
    pieces = np.diff(bounds)
    which = np.searchsorted(cuts, bounds[:-1], side="right")
    return [pieces[which == m] for m in range(parts)]
