"""distca under the lock-step pipeline schedule: every tick's attention balanced over all ranks.

The micro-batches are those of plain packing (:func:`distca.scheduler.sim_model.
micro_batch_streams`: micro-batch ``m`` is ``dp`` slices of ``T`` tokens). Ticks follow
:func:`distca.scheduler.pipeline_sim.lockstep_ticks`, as the runtime runs them
(``distca.parallel.lockstep``): the forward jobs of a tick (stage, micro-batch) are planned
together over all ``dp·pp`` ranks at the planner's tolerance, bubble ranks included (workers
first, then the other ranks as dedicated servers); a job's backward runs on the servers that ran
its forward, so a tick that mixes backwards is balanced only as well as their forward ticks
were. Per tick and rank, per layer: the linear work of its own operation (forward or backward
share) plus the attention it serves, overlapped with its dispatch by ping-pong (``max``) or
added to it. Dispatch bytes per link follow the plan's transfers, NVLink inside a node and the
network across (rank ``s·dp + d`` sits on node ``rank // ranks_per_node``); the backward moves
about the forward's bytes (dO in; dq, dk, dv back), its servers having kept q, k, v. Every
rank joins two all-to-alls (to the servers, back) per layer, tick and nano-batch, each costing
``Hardware.exchange_latency_s`` on top of its bytes. The runtime's bookkeeping around the kernels
(``Hardware.dispatch_cpu_s_per_token`` per token a rank sends as a worker or serves as a query)
is processor work of its own, added to the tick (ping-pong overlaps transfers, not the CPU).

The ``tick`` balance models planning every tick whole instead: all attention of a tick
(forwards and backwards in flight) is spread over the ranks so that each rank's linear work plus
attention is as equal as possible (water-filling; a backward's 2x linear work then no longer
sets the tick), each share padded by the max/mean the planner reached on those micro-batches,
with the runtime plans' dispatch, a backward's bytes ×2 (its inputs q, k, v, out and lse
travel again). It wins where attention dominates and loses where dispatch does.

The ``job`` balance plans every job (stage, micro-batch) alone over all ``dp·pp`` ranks instead
of a tick's jobs together: each job's attention is then within the tolerance on its own, so
every tick, forwards and backwards alike, is the sum of balanced loads and balanced too, at the
price of moving more (a job's attention spreads to the other stages' ranks even when its own
ranks were balanced). The runtime runs it with ``cad.pipeline_plan=job``
(:meth:`distca.exchanges.ExchangeFactory._tick_plans`: one plan per job instead of per tick).
"""

from __future__ import annotations

import numpy as np
from distca.scheduler.documents import documents_from_batch, task_pairs
from distca.scheduler.pipeline_sim import lockstep_ticks, ticks_seconds
from distca.scheduler.plan import Plan
from distca.scheduler.planner import plan_step
from distca.scheduler.sim_model import (
    FWD_ATTENTION,
    FWD_LINEAR,
    Cluster,
    Hardware,
    ModelSpec,
    attention_seconds,
    linear_seconds_per_token,
    micro_batch_streams,
)

# forward: q, k, v in, out + lse back; backward on the same servers: dO in, dq, dk, dv back
FWD_DISPATCH = 0.5
# a backward re-balanced away from its forward's servers also ships q, k, v, out and lse again
MOVED_BACKWARD = 2.0
BALANCES = ("runtime", "tick", "job")


def distca_seconds(lengths: np.ndarray, model: ModelSpec, cluster: Cluster, hw: Hardware,
                   tokens_per_worker: int, tolerance: float = 0.1, ping_pong: bool = True,
                   min_shard_tokens: int = 128) -> tuple[dict[str, float], dict[str, float], int]:
    """({balance: s} step seconds of the :data:`BALANCES` (module docstring), max/mean
    attention over the ranks under the runtime's plans ({"plans": the worst tick plan's,
    "forward": mean over ticks of forwards only, "backward": mean over ticks with a backward}),
    forward dispatch bytes per layer summed over the tick plans) of distca on one step of
    ``dp × M × T`` tokens."""
    dp, stages, t = cluster.dp, cluster.pp, tokens_per_worker
    ranks = dp * stages
    micro = micro_batch_streams(lengths, cluster.micro_batches, dp * t)
    ticks = lockstep_ticks(stages, cluster.micro_batches)
    linear = t * linear_seconds_per_token(model, cluster, hw)
    # per plan kind, micro-batch -> (compute, dispatch, query tokens served) per rank
    served: dict[str, dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]] = {
        "tick": {}, "job": {}}
    achieved: dict[int, float] = {}  # micro-batch -> max/mean of its forward tick's plan
    work = {b: np.zeros((len(ticks), ranks)) for b in BALANCES}
    worst, moved = 1.0, 0
    spreads: dict[str, list[float]] = {"forward": [], "backward": []}
    for k, row in enumerate(ticks):
        jobs = [(s, op[1]) for s, op in enumerate(row) if op is not None and op[0] == "F"]
        if jobs:
            plan, per_job = _plan_tick(jobs, micro, model, cluster, hw, t, tolerance,
                                       min_shard_tokens)
            served["tick"].update(zip((m for _, m in jobs), per_job))
            achieved.update((m, plan.imbalance) for _, m in jobs)
            worst, moved = max(worst, plan.imbalance), moved + plan.bytes_moved
            for job in jobs:  # the "job" balance: each job planned alone over all ranks
                served["job"][job[1]] = _plan_tick([job], micro, model, cluster, hw, t,
                                                   tolerance, min_shard_tokens)[1][0]
        own = np.zeros(ranks)
        compute = {b: np.zeros(ranks) for b in work}
        handled = {b: np.zeros(ranks) for b in work}  # tokens sent or served, dispatch-weighted
        dispatch = {b: np.zeros(ranks) for b in work}
        for s, op in enumerate(row):
            if op is None:
                continue
            forward = op[0] == "F"
            own[s * dp:(s + 1) * dp] += linear * (FWD_LINEAR if forward else 1 - FWD_LINEAR)
            share = FWD_DISPATCH if forward else 1 - FWD_DISPATCH
            for b in work:
                job_compute, job_dispatch, job_queries = served[
                    "job" if b == "job" else "tick"][op[1]]
                compute[b] += job_compute * (FWD_ATTENTION if forward else 1 - FWD_ATTENTION)
                handled[b][s * dp:(s + 1) * dp] += t * share
                # "tick" re-places the queries evenly over the ranks, ships backwards' inputs
                handled[b] += share * (job_queries.sum() / ranks if b == "tick" else job_queries)
                moving = MOVED_BACKWARD if b == "tick" and not forward else 1.0
                dispatch[b] += job_dispatch * share * moving
        # every rank joins each round's exchange to the servers and back, per nano-batch
        for d in dispatch.values():
            d += 2 * (2 if ping_pong else 1) * hw.exchange_latency_s
        runtime = compute["runtime"]
        spreads["backward" if any(op and op[0] == "B" for op in row) else "forward"].append(
            runtime.max() / runtime.mean() if runtime.any() else 1.0)
        spread = max(achieved[op[1]] for op in row if op is not None)
        attention = {**compute, "tick": water_fill(own, runtime.sum()) * spread}
        for b, w in work.items():
            w[k] = own + handled[b] * hw.dispatch_cpu_s_per_token + (
                np.maximum(attention[b], dispatch[b]) if ping_pong
                else attention[b] + dispatch[b])
    layers = model.num_layers / stages
    seconds = {b: ticks_seconds(w * layers, hw.cores, hw.others) for b, w in work.items()}
    imbalance = {"plans": worst, **{k: float(np.mean(v)) if v else 1.0
                                    for k, v in spreads.items()}}
    return seconds, imbalance, moved


def water_fill(base: np.ndarray, total: float) -> np.ndarray:
    """Split ``total`` over ranks already holding ``base`` (N,) so that ``base + share`` is as
    equal as possible (shares >= 0): (N,) shares summing to ``total``."""
    x = np.sort(base)
    level = (total + np.cumsum(x)) / np.arange(1, x.size + 1)
    k = int(np.argmax(level <= np.append(x[1:], np.inf)))
    return np.maximum(0.0, level[k] - base)


def _plan_tick(jobs, micro, model: ModelSpec, cluster: Cluster, hw: Hardware, t: int,
               tolerance: float, min_shard_tokens: int):
    """Plan one forward tick; returns the plan and, per job, (ranks,) forward + backward
    attention seconds and dispatch seconds per layer on every physical rank, and the job's query
    tokens each rank serves."""
    dp, ranks = cluster.dp, cluster.dp * cluster.pp
    docs = documents_from_batch(np.concatenate([micro[m] for _, m in jobs]))
    plan = plan_step(docs, len(jobs) * dp, t, num_servers=ranks, tolerance=tolerance,
                     min_shard_tokens=min_shard_tokens, model=model.shape,
                     cost_table=hw.cost_table)
    workers = np.concatenate([s * dp + np.arange(dp) for s, _ in jobs])
    rank_of = np.concatenate([workers, np.setdiff1d(np.arange(ranks), workers)])  # server -> rank
    tasks = plan.tasks
    q, kv = tasks["q_end"] - tasks["q_start"], tasks["kv_end"] - tasks["kv_start"]
    seconds = attention_seconds(task_pairs(q, kv, tasks["causal"]), q, kv, model, cluster, hw)
    task_job = tasks["q_start"] // (dp * t)
    moves = plan.transfers()
    move_job = moves["start"] // (dp * t)
    per_job = []
    for j in range(len(jobs)):
        mine = task_job == j
        where = rank_of[tasks["server"][mine]]
        compute = np.bincount(where, weights=seconds[mine], minlength=ranks)
        queries = np.bincount(where, weights=q[mine], minlength=ranks)
        per_job.append((compute, dispatch_seconds(moves[move_job == j], rank_of, plan, cluster,
                                                  hw), queries))
    return plan, per_job


def dispatch_seconds(moves: np.ndarray, rank_of: np.ndarray, plan: Plan, cluster: Cluster,
                     hw: Hardware) -> np.ndarray:
    """(ranks,) forward + backward seconds per layer each rank spends on these transfers (rows of
    :meth:`Plan.transfers`; ``rank_of`` maps plan workers/servers to ranks): the busier of send
    and receive, spread over its tp GPUs' links."""
    src, dst = rank_of[moves["src"]], rank_of[moves["dst"]]
    length = (moves["end"] - moves["start"]).astype(np.float64)
    m = plan.model
    q_in = m.h_q * m.head_dim * m.bytes_per_elem
    into_dst = np.where(moves["is_kv"], m.kv_bytes, q_in) * length
    back_to_src = np.where(moves["is_kv"], 0, m.q_bytes - q_in) * length
    same_node = src // cluster.ranks_per_node == dst // cluster.ranks_per_node
    bw = np.where(same_node, hw.nvlink_bytes_per_s, hw.network_bytes_per_s) * cluster.tp
    n = rank_of.size
    received = np.bincount(dst, weights=into_dst / bw, minlength=n) + \
        np.bincount(src, weights=back_to_src / bw, minlength=n)
    sent = np.bincount(src, weights=into_dst / bw, minlength=n) + \
        np.bincount(dst, weights=back_to_src / bw, minlength=n)
    return np.maximum(received, sent) / FWD_DISPATCH
