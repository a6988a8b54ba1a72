"""Calibrating the step-time simulator on this CPU: predicted vs measured step time.

The simulator's cost model is fed from measurements only:

* attention: the ``distca profile attention`` table of the tiny model (``--table``, one thread
  per rank as the ranks run), read by :class:`distca.scheduler.CostTable`;
* communication: ``distca profile comm`` bus bandwidth at ``--comm-size`` bytes on ``world``
  ranks, used as every link's bandwidth;
* linear layers: seconds per token of a measured colocated step on a batch of short documents
  (whose attention the table predicts and is subtracted), spread over the layers; this lumps
  embeddings, norms, loss, optimizer and the gradient all-reduce in with the linear layers.

Then real steps run on ``world`` gloo ranks (the skewed batch of ``benchmarks/runtime.py``:
one ``--tokens``-token document on rank 0, short documents elsewhere) in colocated and
disaggregated (ping-pong) mode, and the simulator predicts the same batches
(``packing`` and ``distca`` systems with tp=1).

CPU contention: the ranks are processes with one thread each, sharing ``--cores`` cores with
whatever else runs on the machine; the table (``profile attention --clock cpu``) and the linear
time are in CPU seconds, the work a rank does on a core of its own. While ``k`` ranks compute
next to ``x`` other runnable threads, each rank runs at ``min(1, cores / (k + x))`` of a core
(processor sharing; a rank waiting in gloo uses no core). The short batch, where every rank
computes all the time, gives both unknowns: its CPU seconds per rank fit the linear time, and
its CPU seconds over its wall seconds the share ``s`` each busy rank got, hence ``x``. A
disaggregated step keeps every rank busy (the planner balances attention, linear work is even)
and is predicted at share ``s``; a colocated step lets the ranks with short documents finish
early and free their core, so it is predicted as the processor-sharing finish time of the
per-rank work.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
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
from distca.profile.comm import free_port, profile_comm

ROOT = Path(__file__).resolve().parents[1]
MODES = {"colocated": ["cad.enabled=false"],
         "distca": ["cad.enabled=true", "cad.ping_pong=true"]}


def batch_lengths(kind: str, ranks: int, tokens: int, short: int) -> np.ndarray:
    """``skewed``: one full-rank document then short ones; ``short``: short documents only."""
    n_short = (ranks - 1) * tokens // short if kind == "skewed" else ranks * tokens // short
    return np.array(([tokens] if kind == "skewed" else []) + [short] * n_short, dtype=np.int64)


def packed(lengths: np.ndarray, ranks: int, tokens: int, seed: int):
    from distca.batch import PackedBatch

    ids = np.random.default_rng(seed).integers(0, 512, ranks * tokens)
    return PackedBatch(ids, np.roll(ids, -1), lengths, tokens)


def overrides(world: int, args) -> list[str]:
    return [f"parallel.dp={world}", f"data.tokens_per_rank={args.tokens}",
            f"cad.min_shard_tokens={args.min_shard}", f"cad.tolerance={args.tolerance}",
            "attention.backend=cpp"]


def _rank(rank: int, world: int, port: int, args, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    from distca.rank import make_rank

    common = overrides(world, args)
    engines = {m: make_rank(load_config(ROOT / "recipes" / "tiny.yaml", common + extra))
               for m, extra in MODES.items()}
    runs = [("short", "colocated")] + [("skewed", m) for m in MODES]
    times = {run: [] for run in runs}
    cpu = {run: [] for run in runs}
    for step in range(args.warmup + args.steps):
        for kind, mode in runs:  # alternating: load on the machine hits every run alike
            batch = [packed(batch_lengths(kind, world, args.tokens, args.short), world,
                            args.tokens, step)]
            dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            engines[mode].train_step(batch)
            used = time.process_time() - start_cpu  # before the barrier: its wait is not work
            dist.barrier()
            if step >= args.warmup:
                times[(kind, mode)].append(time.perf_counter() - start)
                cpu[(kind, mode)].append(used)
    short_cpu = torch.tensor([statistics.median(cpu[("short", "colocated")])],
                             dtype=torch.float64)
    dist.all_reduce(short_cpu)
    if rank == 0:
        result = {f"{k}/{m}": statistics.median(v) for (k, m), v in times.items()}
        queue.put({**result, "short_cpu": float(short_cpu) / world})
    dist.destroy_process_group()


def measure(world: int, args) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    result = queue.get()
    for p in procs:
        p.join()
    return result


def shared_finish(work: np.ndarray, cores: float, others: float = 0.0) -> float:
    """Seconds until the last of these works (CPU seconds, one per rank) finishes when the busy
    ranks and ``others`` outside threads share ``cores`` cores equally (processor sharing) and
    a finished rank frees its share."""
    clock, done = 0.0, 0.0
    for i, w in enumerate(np.sort(np.asarray(work, dtype=np.float64))):
        active = work.size - i
        clock += (w - done) / min(1.0, cores / (active + others))
        done = w
    return clock


def predict(world: int, args, table: CostTable, bandwidth: float, measured: dict) -> dict:
    """Predicted skewed-batch step seconds from the table, the comm bandwidth and the short
    batch's median wall and mean CPU seconds per rank (``measured``)."""
    cfg = load_config(ROOT / "recipes" / "tiny.yaml", overrides(world, args))
    m = cfg.model
    model = ModelSpec(m.num_layers, m.hidden_size, m.num_attention_heads, m.num_kv_heads,
                      m.ffn_hidden_size, bytes_per_elem=4)
    cluster = Cluster(world, tp=1, gpus_per_node=world, micro_batches=1)
    share = min(1.0, measured["short_cpu"] / measured["short/colocated"])
    others = max(0.0, args.cores / share - world)

    def hardware(linear_s_per_token_layer: float, share: float) -> Hardware:
        # The simulator charges linear_flops_per_token / (peak · mfu) per token and layer.
        slow_table = CostTable(table.q_lens, table.kv_lens, table.pairs_per_s * share)
        return Hardware(peak_flops=model.linear_flops_per_token / linear_s_per_token_layer
                        * share, linear_mfu=1.0, nvlink_bytes_per_s=bandwidth,
                        network_bytes_per_s=bandwidth, cost_table=slow_table)

    def rank_work(lengths: np.ndarray, linear: float) -> np.ndarray:
        """(world,) CPU seconds of each rank's colocated step: its layers' linear work and the
        attention of its own documents."""
        seg = build_segments(documents_from_batch(lengths), args.tokens)
        seconds = attention_seconds(seg.pairs(), seg.q_end - seg.q_start,
                                    seg.kv_end - seg.kv_start, model, cluster,
                                    hardware(1.0, 1.0))
        attention = np.bincount(seg.home, weights=seconds, minlength=world)
        return m.num_layers * (attention + args.tokens * linear)

    short = batch_lengths("short", world, args.tokens, args.short)
    attention_short = rank_work(short, 0.0).mean()
    linear = (measured["short_cpu"] - attention_short) / (m.num_layers * args.tokens)
    if linear <= 0:
        raise RuntimeError("the short-document step uses less CPU than its predicted attention")
    skewed = batch_lengths("skewed", world, args.tokens, args.short)
    step = simulate_batch(skewed, model, cluster, hardware(linear, share), args.tokens,
                          args.tolerance)
    return {"colocated": shared_finish(rank_work(skewed, linear), args.cores, others),
            "distca": step.seconds["distca"], "linear_s_per_token_layer": linear,
            "share": share, "others": others}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
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
    args = parser.parse_args()
    table = CostTable.from_csv(args.table)
    print(f"tiny model, cpp attention, {args.tokens} tokens/rank, skewed batch (one "
          f"{args.tokens}-token document, {args.short}-token documents), median of {args.steps} "
          f"steps; table {args.table}")
    print(f"ranks share {args.cores:g} cores (processor sharing); load: 1-minute load average "
          "after the measurement; share: core fraction per busy rank on the short batch; "
          "others: outside threads that implies")
    print("| ranks | load | share | others | comm GB/s | linear CPU µs/token/layer | mode | "
          "predicted s | measured s | predicted / measured |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for world in args.ranks:
        comm = profile_comm(world, [args.comm_size], iters=5)["rows"][0]["bus_GBps"] * 1e9
        measured = measure(world, args)
        load = os.getloadavg()[0]
        pred = predict(world, args, table, comm, measured)
        for mode in MODES:
            got = measured[f"skewed/{mode}"]
            print(f"| {world} | {load:.1f} | {pred['share']:.2f} | {pred['others']:.1f} | "
                  f"{comm / 1e9:.2f} | {pred['linear_s_per_token_layer'] * 1e6:.1f} | "
                  f"{mode} | {pred[mode]:.3f} | {got:.3f} | {pred[mode] / got:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
