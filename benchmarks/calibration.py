"""Calibrating the step-time simulator on this CPU: predicted vs measured step time.

The simulator's cost model is fed from measurements only:

* attention: the ``distca profile attention`` table of the tiny model (``--table``, one thread
  per rank as the ranks run), read by :class:`distca.scheduler.CostTable`;
* communication: an α-β model of ``all_to_all_single`` timed (as ``distca profile comm`` does)
  on the same ranks between the measured steps, so it sees the same load: the latency α of a
  one-element exchange and the bus bandwidth of ``--comm-size`` bytes beyond it (medians);
* linear layers: CPU seconds per token and layer of a measured colocated step on a batch of
  short documents (whose attention the table predicts and is subtracted); this lumps
  embeddings, norms, loss, optimizer and the gradient all-reduce in with the linear layers;
* disaggregated attention's bookkeeping (``Hardware.dispatch_cpu_s_per_token``): the extra CPU
  seconds per rank of a disaggregated step over a colocated one on the same short-document
  batch (same attention work: whole short documents), per token handled (sent as a worker or
  served as a query) and layer. It lumps what the runtime does around the kernels: per-tick
  plans and layouts, packing q/k/v and dO, unpacking and merging partial rows, scattering
  gradients, nano-batch splits and the asynchronous exchanges' bookkeeping.

Then real steps run on ``dp × pp`` gloo ranks, ``--micro-batches`` micro-batches of ``--tokens``
tokens per rank, on the skewed batch (micro-batch 0 holds one ``--tokens``-token document on
data-parallel rank 0, every other slice short documents) in colocated mode (1F1B with pp > 1)
and disaggregated mode (ping-pong; the lock-step schedule with pp > 1), alternating so that the
machine's load hits both alike; the simulator predicts the same micro-batches (``packing`` and
``distca`` with tp=1), its pipelines played by :mod:`distca.scheduler.pipeline_sim`.

CPU contention: the ranks are processes with one thread each, sharing ``--cores`` cores with
whatever else runs on the machine; the table (``profile attention --clock cpu``) and the linear
time are in CPU seconds, the work a rank does on a core of its own. While ``k`` ranks compute
next to ``x`` other runnable threads, each runs at ``min(1, cores / (k + x))`` of a core
(processor sharing; a rank waiting in gloo or in the pipeline bubble uses no core). ``x`` is
fitted so that the simulator reproduces the short batch's measured wall times of both modes
(least squared log error; the disaggregated one with the measured bookkeeping); the skewed
batch's modes are then predictions (all from the medians over the steps, which resist the
load's bursts better than a fit per step). The short batch is the reference: the only numbers
fitted on it are the linear time, the bookkeeping and ``x``. The all-to-all bandwidth is a wall-clock figure
measured with every rank busy, so it enters the simulator (which slows all work by the sharing)
divided by that share (and the latency multiplied by it).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distca.scheduler import CostTable
from distca.scheduler.documents import build_segments, documents_from_batch
from distca.scheduler.simulator import (
    Cluster,
    Hardware,
    ModelSpec,
    attention_seconds,
    simulate_batch,
)

from distca.config import load_config
from distca.profile.comm import free_port

ROOT = Path(__file__).resolve().parents[1]
# disaggregated bookkeeping per token and layer (Hardware.dispatch_cpu_s_per_token): none (as
# before it was modelled), or the short batch's measured CPU seconds over colocated
BOOKKEEPING = ("none", "CPU")
CLOCKS = {"cpu": time.process_time, "thread": time.thread_time}
MODES = {"colocated": ["cad.enabled=false"],
         "distca": ["cad.enabled=true", "cad.ping_pong=true"]}
# with --job-plans (pp > 1) the skewed batch also runs the lock-step pipeline with one plan per
# job (simulator: distca-job), side by side with the default per-tick plans
JOB_PLANS = {"distca-job": MODES["distca"] + ["cad.pipeline_plan=job"]}


def micro_batch_lengths(kind: str, dp: int, micro: int, tokens: int, short: int
                        ) -> list[np.ndarray]:
    """Document lengths of each micro-batch (``dp`` slices of ``tokens``, back to back):
    ``skewed``: micro-batch 0 starts with one ``tokens``-token document, everything else short
    documents; ``short``: short documents only."""
    batches = []
    for m in range(micro):
        long = kind == "skewed" and m == 0
        n_short = (dp - long) * tokens // short
        batches.append(np.array([tokens] * long + [short] * n_short, dtype=np.int64))
    return batches


def packed(lengths: np.ndarray, dp: int, tokens: int, seed: int):
    from distca.batch import PackedBatch

    ids = np.random.default_rng(seed).integers(0, 512, dp * tokens)
    return PackedBatch(ids, np.roll(ids, -1), lengths, tokens)


def overrides(dp: int, args) -> list[str]:
    return [f"parallel.dp={dp}", f"parallel.pp={args.pp}", f"data.tokens_per_rank={args.tokens}",
            f"data.micro_batches={args.micro_batches}", f"cad.min_shard_tokens={args.min_shard}",
            f"cad.tolerance={args.tolerance}", "attention.backend=cpp"]


def _rank(rank: int, world: int, port: int, dp: int, args, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    from distca.rank import make_rank

    common = overrides(dp, args)
    modes = {**MODES, **(JOB_PLANS if args.job_plans else {})}
    engines = {m: make_rank(load_config(ROOT / "recipes" / "tiny.yaml", common + extra))
               for m, extra in modes.items()}
    runs = [("short", m) for m in MODES] + [("skewed", m) for m in modes]
    times = {run: [] for run in runs}
    # CPU seconds of the whole process (gloo's transfer threads and syscalls included) and of
    # the main thread alone (the step's own computation and bookkeeping)
    cpu = {(run, clock): [] for run in runs for clock in CLOCKS}
    exchanges = []
    for step in range(args.warmup + args.steps):
        small = _exchange_seconds(world, 4 * world)  # one float per peer: the latency
        exchanges.append((small, _exchange_seconds(world, args.comm_size)))
        for kind, mode in runs:  # alternating: load on the machine hits every run alike
            batch = [packed(lengths, dp, args.tokens, step * args.micro_batches + m)
                     for m, lengths in enumerate(micro_batch_lengths(
                         kind, dp, args.micro_batches, args.tokens, args.short))]
            dist.barrier()
            start, start_cpu = time.perf_counter(), [c() for c in CLOCKS.values()]
            engines[mode].train_step(batch)
            # read before the barrier: its wait is not work
            used = [c() - c0 for c, c0 in zip(CLOCKS.values(), start_cpu)]
            dist.barrier()
            if step >= args.warmup:
                times[(kind, mode)].append(time.perf_counter() - start)
                for clock, u in zip(CLOCKS, used):
                    cpu[((kind, mode), clock)].append(u)
    cpu_medians = torch.tensor([statistics.median(v) for v in cpu.values()], dtype=torch.float64)
    dist.all_reduce(cpu_medians)  # summed over the ranks
    if rank == 0:
        result = {f"{k}/{m}": statistics.median(v) for (k, m), v in times.items()}
        spread = {f"{k}/{m}/all": v for (k, m), v in times.items()}
        cpus = {f"{k}/{m}/{clock}": float(c) / world
                for ((k, m), clock), c in zip(cpu, cpu_medians)}
        queue.put({**result, **spread, **cpus, "short_cpu": cpus["short/colocated/cpu"],
                   "exchange_s/all": exchanges[args.warmup:]})
    dist.destroy_process_group()


def _exchange_seconds(world: int, size: int, iters: int = 5) -> float:
    """Seconds of one ``all_to_all_single`` of ``size`` bytes per rank (the slowest rank's)."""
    numel = max(world, size // 4 // world * world)
    send = torch.randn(numel)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        dist.all_to_all_single(recv, send)
    elapsed = torch.tensor([(time.perf_counter() - start) / iters], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def measure(dp: int, args) -> dict[str, float]:
    world = dp * args.pp
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, dp, args, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    result = queue.get()
    for p in procs:
        p.join()
    return result


def predict(dp: int, args, table: CostTable, latency: float, bandwidth: float, short_cpu: float,
            short_wall: float, short_cad_cpu: float, short_cad_wall: float) -> dict:
    """Predicted step seconds from the table, the all-to-all latency (s) and bandwidth
    (bytes/s), the short batch's mean CPU seconds per rank (colocated, disaggregated) and wall
    seconds (colocated: the load; disaggregated: the wall fit of the bookkeeping).

    Returns ``{"colocated": s, "distca": {variant: s}, "short_distca": {variant: s}, ...}``
    with the bookkeeping variants of :data:`BOOKKEEPING`."""
    cfg = load_config(ROOT / "recipes" / "tiny.yaml", overrides(dp, args))
    m = cfg.model
    model = ModelSpec.of(m, bytes_per_elem=4)
    world = dp * args.pp
    cluster = Cluster(world, tp=1, pp=args.pp, gpus_per_node=world,
                      micro_batches=args.micro_batches)
    layers = m.num_layers / args.pp

    def stream(kind: str) -> np.ndarray:
        return np.concatenate(micro_batch_lengths(kind, dp, args.micro_batches, args.tokens,
                                                  args.short))

    # linear CPU seconds per token and layer: the short step's CPU per rank minus its attention
    seg = build_segments(documents_from_batch(stream("short")), args.tokens)
    attention = attention_seconds(seg.pairs(), seg.q_end - seg.q_start,
                                  seg.kv_end - seg.kv_start, model, cluster,
                                  Hardware(cost_table=table)).sum() * m.num_layers / world
    linear = (short_cpu - attention) / (layers * args.micro_batches * args.tokens)
    if linear <= 0:
        raise RuntimeError("the short-document step uses less CPU than its predicted attention")
    # the simulator charges linear_flops_per_token / (peak · mfu) per token and layer
    hw = Hardware(peak_flops=model.linear_flops_per_token / linear, linear_mfu=1.0,
                  cost_table=table, cores=args.cores)

    def step(kind: str, hw: Hardware) -> dict[str, float]:
        return simulate_batch(stream(kind), model, cluster, hw, args.tokens, args.tolerance,
                              cp=1, min_shard_tokens=args.min_shard).seconds

    # bookkeeping per handled token and layer: every rank sends its micro-batches' tokens and,
    # on the short batch, serves as many queries on average (whole documents, no kv split)
    per_token = {"none": 0.0,
                 "CPU": (short_cad_cpu - short_cpu) / (2 * args.micro_batches * args.tokens
                                                       * layers)}

    def machine(x: float, bookkeeping: float) -> Hardware:
        """The hardware with ``x`` outside runnable threads; the all-to-all was timed with
        every rank busy, its bandwidth and latency are scaled by the share they had."""
        share = min(1.0, args.cores / (world + x))
        return replace(hw, others=x, nvlink_bytes_per_s=bandwidth / share,
                       network_bytes_per_s=bandwidth / share, exchange_latency_s=latency * share,
                       dispatch_cpu_s_per_token=bookkeeping)

    def misfit(x: float) -> float:
        """Squared log errors of both short-batch steps (the machine's load) at ``x``."""
        short = step("short", machine(x, per_token["CPU"]))
        return (math.log(short["packing"] / short_wall) ** 2
                + math.log(short["distca"] / short_cad_wall) ** 2)

    lo, hi = 0.0, 64.0  # outside runnable threads: ternary search (the misfit is unimodal)
    for _ in range(40):
        a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        lo, hi = (lo, b) if misfit(a) < misfit(b) else (a, hi)
    others = (lo + hi) / 2
    skewed = {v: step("skewed", machine(others, c)) for v, c in per_token.items()}
    short = {v: step("short", machine(others, c)) for v, c in per_token.items()}
    return {"colocated": skewed["none"]["packing"],
            "distca": {v: s["distca"] for v, s in skewed.items()},
            "distca-job": {v: s["distca-job"] for v, s in skewed.items()},
            "short_colocated": short["none"]["packing"],
            "short_distca": {v: s["distca"] for v, s in short.items()},
            "bookkeeping": per_token, "linear_s_per_token_layer": linear, "others": others}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dp", type=int, nargs="+", default=[2, 4],
                        help="data-parallel sizes to measure, one run each")
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages (1)")
    parser.add_argument("--micro-batches", type=int, default=1,
                        help="micro-batches per step (1)")
    parser.add_argument("--table", required=True, help="distca profile attention CSV (tiny, 1 "
                        "thread)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    parser.add_argument("--short", type=int, default=128)
    parser.add_argument("--min-shard", type=int, default=64)
    parser.add_argument("--tolerance", type=float, default=0.1)
    parser.add_argument("--comm-size", default=256 * 1024, type=int)
    parser.add_argument("--steps", type=int, default=3, help="timed steps; the median counts")
    parser.add_argument("--cores", type=float, default=os.cpu_count(),
                        help="CPU cores the ranks share (default: all of this machine's)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--job-plans", action="store_true",
                        help="also run the skewed batch with cad.pipeline_plan=job (pp > 1)")
    args = parser.parse_args()
    for flag in ("pp", "micro_batches", "tokens", "short", "steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    table = CostTable.from_csv(args.table)
    print(f"tiny model, cpp attention, pp={args.pp}, {args.micro_batches} micro-batches of "
          f"{args.tokens} tokens/rank, skewed batch (micro-batch 0: one {args.tokens}-token "
          f"document on dp rank 0; {args.short}-token documents elsewhere), {args.steps} steps "
          f"of each mode, interleaved; table {args.table}")
    print(f"ranks share {args.cores:g} cores (processor sharing): others, the outside runnable "
          "threads, are fitted to the short batch's median wall times (both modes); comm: the median "
          "all-to-all timing between the steps; spread: [min, max] of the per-step measured "
          "colocated / distca ratio (the machine's noise)")
    print("| dp | pp | load | others | all-to-all ms + GB/s | linear CPU µs/token/layer | "
          "bookkeeping µs/token/layer | mode | predicted s | measured s | "
          "predicted / measured |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    median = statistics.median
    for dp in args.dp:
        measured = measure(dp, args)
        load = os.getloadavg()[0]
        latency = median(small for small, _ in measured["exchange_s/all"])
        numel = max(dp * args.pp, args.comm_size // 4 // (dp * args.pp) * (dp * args.pp))
        leaving = numel * 4 * (dp * args.pp - 1) / (dp * args.pp)
        big = median(big for _, big in measured["exchange_s/all"])
        # under bursty load the small exchange's median can reach the big one's: then at least
        # half the big exchange counts as transfer
        comm = leaving / max(big - latency, big / 2)
        pred = predict(dp, args, table, latency, comm, measured["short_cpu"],
                       measured["short/colocated"], measured["short/distca/cpu"],
                       measured["short/distca"])
        rows = [("colocated", "-", "skewed/colocated", pred["colocated"]),
                ("colocated, short batch", "-", "short/colocated", pred["short_colocated"])]
        for v in BOOKKEEPING:
            rows += [("distca", v, "skewed/distca", pred["distca"][v]),
                     ("distca, short batch", v, "short/distca", pred["short_distca"][v])]
            if args.job_plans:
                rows.append(("distca-job", v, "skewed/distca-job", pred["distca-job"][v]))
        for label, v, key, want in rows:
            got = measured[key]
            cost = "-" if v == "-" else f"{v}: {pred['bookkeeping'][v] * 1e6:.1f}"
            print(f"| {dp} | {args.pp} | {load:.1f} | {pred['others']:.1f} | "
                  f"{latency * 1e3:.1f} + {comm / 1e9:.3f} | "
                  f"{pred['linear_s_per_token_layer'] * 1e6:.1f} | {cost} | {label} | "
                  f"{want:.3f} | {got:.3f} | {want / got:.2f} |", flush=True)
        got = measured["skewed/colocated"] / measured["skewed/distca"]
        steps = [c / d for c, d in zip(measured["skewed/colocated/all"],
                                       measured["skewed/distca/all"])]
        for v in BOOKKEEPING:
            want = pred["colocated"] / pred["distca"][v]
            print(f"- dp={dp}, bookkeeping {v}: colocated / distca: predicted {want:.2f}, "
                  f"measured {got:.2f} (ratio error {want / got - 1:+.0%})")
        print(f"- dp={dp}: per-step measured colocated / distca spread [{min(steps):.2f}, "
              f"{max(steps):.2f}]")
        if args.job_plans:
            got = measured["skewed/distca"] / measured["skewed/distca-job"]
            for v in BOOKKEEPING:
                want = pred["distca"][v] / pred["distca-job"][v]
                print(f"- dp={dp}, bookkeeping {v}: distca (tick plans) / distca-job: predicted "
                      f"{want:.2f}, measured {got:.2f} (ratio error {want / got - 1:+.0%})")
        print(f"- dp={dp}: CPU seconds per rank (median): colocated "
              f"{measured['skewed/colocated/cpu']:.3f}, distca {measured['skewed/distca/cpu']:.3f} "
              "(the skewed batch)")
        print(f"- dp={dp}: short batch median {measured['short/colocated']:.3f} s wall "
              f"colocated, {measured['short/distca']:.3f} s distca; CPU s per rank "
              f"{measured['short_cpu']:.3f} colocated, {measured['short/distca/cpu']:.3f} "
              f"distca (main thread {measured['short/colocated/thread']:.3f}, "
              f"{measured['short/distca/thread']:.3f}); all-to-all "
              f"{latency * 1e3:.2f} ms + {comm / 1e9:.3f} GB/s", flush=True)

if __name__ == "__main__":
    main()
