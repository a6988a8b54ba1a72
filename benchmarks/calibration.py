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

    .venv/bin/python benchmarks/calibration.py --ranks 2 4 --table benchmarks/results/calibration_attention.csv
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distca.scheduler import CostTable
from distca.scheduler.simulator import Cluster, Hardware, ModelSpec, simulate_batch

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
    from distca.engine import Engine

    common = overrides(world, args)
    engines = {m: Engine(load_config(ROOT / "recipes" / "tiny.yaml", common + extra))
               for m, extra in MODES.items()}
    runs = [("short", "colocated")] + [("skewed", m) for m in MODES]
    times = {run: [] for run in runs}
    for step in range(args.warmup + args.steps):
        for kind, mode in runs:  # alternating: load on the machine hits every run alike
            batch = [packed(batch_lengths(kind, world, args.tokens, args.short), world,
                            args.tokens, step)]
            dist.barrier()
            start = time.perf_counter()
            engines[mode].train_step(batch)
            dist.barrier()
            if step >= args.warmup:
                times[(kind, mode)].append(time.perf_counter() - start)
    if rank == 0:
        queue.put({f"{k}/{m}": statistics.median(v) for (k, m), v in times.items()})
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


def predict(world: int, args, table: CostTable, bandwidth: float, measured_short: float) -> dict:
    cfg = load_config(ROOT / "recipes" / "tiny.yaml", overrides(world, args))
    m = cfg.model
    model = ModelSpec(m.num_layers, m.hidden_size, m.num_attention_heads, m.num_kv_heads,
                      m.ffn_hidden_size, bytes_per_elem=4)
    cluster = Cluster(world, tp=1, gpus_per_node=world, micro_batches=1)

    def hardware(linear_s_per_token_layer: float) -> Hardware:
        # The simulator charges linear_flops_per_token / (peak · mfu) per token and layer.
        return Hardware(peak_flops=model.linear_flops_per_token / linear_s_per_token_layer,
                        linear_mfu=1.0, nvlink_bytes_per_s=bandwidth,
                        network_bytes_per_s=bandwidth, cost_table=table)

    short = batch_lengths("short", world, args.tokens, args.short)
    probe = simulate_batch(short, model, cluster, hardware(1.0), args.tokens, args.tolerance)
    # with 1 s per token and layer, the prediction is layers·tokens + attention: solve for it
    attention_short = probe.seconds["packing"] - m.num_layers * args.tokens
    linear = (measured_short - attention_short) / (m.num_layers * args.tokens)
    if linear <= 0:
        raise RuntimeError("the short-document step is faster than its predicted attention")
    skewed = batch_lengths("skewed", world, args.tokens, args.short)
    step = simulate_batch(skewed, model, cluster, hardware(linear), args.tokens, args.tolerance)
    return {"colocated": step.seconds["packing"], "distca": step.seconds["distca"],
            "linear_s_per_token_layer": linear, "attention_short_s": attention_short}


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
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    table = CostTable.from_csv(args.table)
    print(f"tiny model, cpp attention, {args.tokens} tokens/rank, skewed batch (one "
          f"{args.tokens}-token document, {args.short}-token documents), median of {args.steps} "
          f"steps; table {args.table}")
    print("| ranks | comm GB/s | linear µs/token/layer | mode | predicted s | measured s | "
          "predicted / measured |")
    print("|---|---|---|---|---|---|---|")
    for world in args.ranks:
        comm = profile_comm(world, [args.comm_size], iters=5)["rows"][0]["bus_GBps"] * 1e9
        measured = measure(world, args)
        pred = predict(world, args, table, comm, measured["short/colocated"])
        for mode in MODES:
            got = measured[f"skewed/{mode}"]
            print(f"| {world} | {comm / 1e9:.2f} | {pred['linear_s_per_token_layer'] * 1e6:.1f} | "
                  f"{mode} | {pred[mode]:.3f} | {got:.3f} | {pred[mode] / got:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
