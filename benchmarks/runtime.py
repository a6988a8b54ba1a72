"""Disaggregated vs colocated core attention on a skewed batch (CPU, gloo, 2 and 4 ranks).

The batch puts one long document on worker 0 and many short ones on the other workers, so the
colocated run waits on worker 0's quadratic attention. Three engines with the same weights live
in the same processes and alternate step by step, so their step times are measured side by side:
colocated (``cad.enabled=false``), disaggregated with blocking exchanges, and disaggregated with
ping-pong. Per rank it reports the forward attention time spent serving tasks (busy), the rest
of the forward dispatch (exchange + waiting for other ranks), and the exposed communication:
seconds blocked on the exchanges in forward and backward.

    .venv/bin/python benchmarks/runtime.py --ranks 2 4 --tokens 2048 --steps 4 --backend cpp
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
MODES = {"colocated": ["cad.enabled=false"],
         "disaggregated": ["cad.enabled=true", "cad.ping_pong=false"],
         "disaggregated+pingpong": ["cad.enabled=true", "cad.ping_pong=true"]}


def skewed_batch(ranks: int, tokens: int, short: int, seed: int):
    from distca.batch import PackedBatch

    rng = np.random.default_rng(seed)
    docs = np.array([tokens] + [short] * ((ranks - 1) * tokens // short), dtype=np.int64)
    ids = rng.integers(0, 512, ranks * tokens)
    return PackedBatch(ids, np.roll(ids, -1), docs, tokens)


def _rank(rank: int, world: int, port: int, args, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    from distca.config import load_config
    from distca.engine import Engine

    common = [f"parallel.dp={world}", f"data.tokens_per_rank={args.tokens}",
              "cad.min_shard_tokens=64", f"cad.tolerance={args.tolerance}",
              f"attention.backend={args.backend}"]
    engines = {}
    for mode, extra in MODES.items():
        engines[mode] = Engine(load_config(ROOT / "recipes" / "tiny.yaml", common + extra))
        engines[mode].load_state_dict(engines["colocated"].state_dict())
    rows = {mode: [] for mode in engines}
    for step in range(args.warmup + args.steps):
        batch = [skewed_batch(world, args.tokens, args.short, step)]
        for mode, engine in engines.items():
            engine.runtime.timings = {}
            dist.barrier()
            start = time.perf_counter()
            stats = engine.train_step(batch)
            dist.barrier()
            elapsed = time.perf_counter() - start
            if step >= args.warmup:
                t = engine.runtime.timings
                rows[mode].append((elapsed, stats["imbalance_before"], stats["imbalance"],
                                   t.get("serve", 0.0), t.get("attend", 0.0) - t.get("serve", 0.0),
                                   t.get("comm_wait", 0.0), stats["loss"]))
    queue.put((rank, {m: [statistics.median(col) for col in zip(*r)] for m, r in rows.items()}))
    dist.destroy_process_group()


def run(world: int, args) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get() for _ in procs)
    for p in procs:
        p.join()
    lines = []
    step = {m: results[0][m][0] for m in MODES}
    for mode in MODES:
        for r in range(world):
            t, before, after, busy, rest, comm, loss = results[r][mode]
            lines.append(f"| {world} | {mode} | {r} | {t:.3f} | {busy:.3f} | {rest:.3f} | "
                         f"{comm:.3f} | {before:.2f} | {after:.2f} | {loss:.4f} |")
    for mode in ("disaggregated", "disaggregated+pingpong"):
        lines.append(f"| {world} | **speedup** colocated / {mode} step time | | "
                     f"**{step['colocated'] / step[mode]:.2f}x** | | | | | | |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per worker")
    parser.add_argument("--short", type=int, default=128, help="length of the short documents")
    parser.add_argument("--tolerance", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--backend", default="torch", choices=["torch", "cpp", "auto"],
                        help="attention.backend of every engine")
    args = parser.parse_args()
    print(f"tiny model, {args.tokens} tokens/worker, one {args.tokens}-token document on worker 0, "
          f"{args.short}-token documents elsewhere, eps={args.tolerance}, backend {args.backend}, "
          f"median of {args.steps} steps; forward attention times per rank (busy = serving tasks, "
          "rest = exchange + wait); exposed comm = blocked on exchanges, fwd + bwd")
    print("| ranks | mode | rank | step s | fwd attn busy s | fwd exchange+wait s | "
          "exposed comm s | imbalance before | imbalance after | loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for world in args.ranks:
        for line in run(world, args):
            print(line, flush=True)


if __name__ == "__main__":
    main()
