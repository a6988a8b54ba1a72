"""What core attention keeps for backward on a rank, from the planner's placement.

Core attention is never recomputed (:mod:`distca.model.recompute`), so its saved tensors count
at every ``model.recompute``. Per layer and micro-batch, on rank ``s`` (server ``s`` and worker
``s``; ``hq``, ``hkv`` heads of one TP rank, head dim ``d``, ``b`` bytes of the compute dtype):

* as a server, over the ``Q_s`` query rows and ``K_s`` kv rows it received (the planner's
  receive sizes, :func:`distca.parallel.planning.receive_bytes`): q and the kernel's out
  (``2·Q_s·hq·d·b``), k and v (``2·K_s·hkv·d·b``) and the fp32 lse (``4·Q_s·hq``);
* as a worker, the ``R_s`` partial rows servers returned (fp32 out and lse, the merge weights:
  ``R_s·hq·(4d + 12)``) and the merged output of its ``T`` tokens (``T·hq·d·b``).

Batches are sampled from the recipe's length distribution (chat recipes: documents of
``data.max_length``) and planned at ``cad.tolerance`` (colocated: nothing moves); the
largest worker rank over a few samples is returned.
"""

from __future__ import annotations

import numpy as np

from distca.config import DataKind, DistcaConfig
from distca.scheduler import plan_step
from distca.scheduler.documents import documents_from_batch
from distca.shapes import plan_shape

SAMPLES = 3


def sample_documents(cfg: DistcaConfig, seed: int) -> np.ndarray:
    """(n,) int64 document lengths filling one micro-batch of ``dp·tokens_per_rank`` tokens."""
    d, budget = cfg.data, cfg.parallel.dp * cfg.data.tokens_per_rank
    if d.kind is DataKind.chat:
        lengths = np.full(-(-budget // d.max_length), d.max_length, dtype=np.int64)
        lengths[-1] = budget - d.max_length * (lengths.size - 1)
        return lengths
    from distca.data.lengths import LengthSampler

    return LengthSampler(d.distribution, d.max_length).fill(np.random.default_rng(seed), budget)


def rank_bytes(plan, tokens_per_rank: int) -> np.ndarray:
    """(num_workers,) bytes core attention keeps per layer on each worker rank (docstring)."""
    s = plan.model
    hq, hkv, d, b = s.h_q, s.h_kv, s.head_dim, s.bytes_per_elem
    workers = plan.num_workers
    kept = np.zeros(plan.num_servers, dtype=np.float64)
    returned = np.zeros(plan.num_servers, dtype=np.float64)
    for server in range(plan.num_servers):
        q_tokens, kv_tokens, *_ = plan.server_inputs(server)
        kept[server] += (2 * q_tokens.size * hq * d + 2 * kv_tokens.size * hkv * d) * b
        kept[server] += 4 * q_tokens.size * hq
        np.add.at(returned, q_tokens // plan.tokens_per_worker, 1)
    kept += returned * hq * (4 * d + 12) + tokens_per_rank * hq * d * b
    return kept[:workers]


def attention_bytes_per_layer(cfg: DistcaConfig) -> float:
    """The largest worker rank's attention bytes per layer and micro-batch (module docstring)."""
    c, p, t = cfg.cad, cfg.parallel, cfg.data.tokens_per_rank
    servers = p.dp + (c.num_dedicated_servers if c.server_mode.value == "dedicated" else 0)
    tolerance = c.tolerance if c.enabled else 1e300  # colocated: the planner moves nothing
    worst = 0.0
    for seed in range(SAMPLES):
        docs = documents_from_batch(sample_documents(cfg, seed), None, None)
        plan = plan_step(docs, num_workers=p.dp, tokens_per_worker=t,
                         num_servers=servers if c.enabled else p.dp, tolerance=tolerance,
                         min_shard_tokens=c.min_shard_tokens, model=plan_shape(cfg))
        worst = max(worst, float(rank_bytes(plan, t).max()))
    return worst
