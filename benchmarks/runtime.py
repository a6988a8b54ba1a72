"""Disaggregated vs colocated core attention on a skewed batch (CPU, gloo, 2 and 4 ranks).

The batch puts one long document on worker 0 and short ones on the other workers, so the
colocated run waits on worker 0's quadratic attention. Three engines with the same weights live
in the same processes and alternate step by step, so their step times are measured side by side:
colocated (``cad.enabled=false``), disaggregated with blocking exchanges, and disaggregated with
ping-pong. Per rank and step it clocks:

* attn fwd / attn bwd: this rank's server kernels (its share of everyone's attention);
* comm wait: blocked on exchanges, forward and backward: the rank's idle time, i.e. transfer
  time not hidden behind compute plus waiting for slower ranks. With blocking exchanges all of
  it is exposed; ping-pong (token nano-batches, each one's exchange overlapping the other's
  linear layers or attention) hides part of it, and the ratio of the two is reported;
* plan: computing (rank 0) and receiving the step's plan;
* other: the rest of the step: linear layers, pack/unpack/merge, optimizer;
* step cpu / attn cpu: CPU seconds of the whole process during the step / of the attention
  kernels. On a shared machine, wall seconds well above CPU seconds mean the rank was waiting
  for a core, not for work.

With ``--pp S`` the ranks form ``S`` pipeline stages (``world / S`` data-parallel workers each)
over ``--micro-batches`` skewed micro-batches: colocated runs 1F1B, both disaggregated modes the
lock-step schedule (bubble ranks serve attention; ping-pong overlaps each round's exchange with
the other nano-batch's linear work); comm wait then includes a stage waiting for the tick's
slowest operation.

The *ideal bound* is the speedup a perfect planner with free communication would reach:
colocated step time over ``max_r(step_r - attn_r - wait_r) + mean_r(attn_r)`` measured on the
colocated run.

    .venv/bin/python benchmarks/runtime.py --ranks 2 4 --tokens 4096 --steps 3 --backend auto
    .venv/bin/python benchmarks/runtime.py --ranks 2 --pp 2 --tokens 2048 --micro-batches 4
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

ROOT = Path(__file__).resolve().parents[1]
MODES = {"colocated": ["cad.enabled=false"],
         "disaggregated": ["cad.enabled=true", "cad.ping_pong=false"],
         "disaggregated+pingpong": ["cad.enabled=true", "cad.ping_pong=true"]}
CLOCKS = ("step", "attn_fwd", "attn_bwd", "comm_wait", "plan", "step_cpu", "attn_cpu",
          "imb_before", "imb_after", "loss")


def skewed_batch(ranks: int, tokens: int, short: int, seed: int):
    """One ``tokens``-long document on worker 0, ``short``-token documents on the others."""
    from distca.batch import PackedBatch

    rng = np.random.default_rng(seed)
    docs = np.array([tokens] + [short] * ((ranks - 1) * tokens // short), dtype=np.int64)
    ids = rng.integers(0, 512, ranks * tokens)
    return PackedBatch(ids, np.roll(ids, -1), docs, tokens)


def _rank(rank: int, world: int, port: int, args, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    from distca.parallel.spans import recording

    from distca.config import load_config
    from distca.rank import make_rank

    dp = world // args.pp
    common = [f"parallel.dp={dp}", f"parallel.pp={args.pp}", f"data.tokens_per_rank={args.tokens}",
              f"cad.min_shard_tokens={args.min_shard}", f"cad.tolerance={args.tolerance}",
              f"attention.backend={args.backend}", *args.model]
    engines = {}
    for mode, extra in MODES.items():
        engines[mode] = make_rank(load_config(ROOT / "recipes" / "tiny.yaml", common + extra))
        engines[mode].load_full_model_state(engines["colocated"].full_model_state())
    rows = {mode: [] for mode in engines}
    for step in range(args.warmup + args.steps):
        batch = [skewed_batch(dp, args.tokens, args.short, step * args.micro_batches + i)
                 for i in range(args.micro_batches)]
        for mode, engine in engines.items():
            dist.barrier()
            start, cpu = time.perf_counter(), time.process_time()
            with recording() as clocks:  # spans: serve, comm_wait, plan, ...
                stats = engine.train_step(batch)
            dist.barrier()
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
            if step >= args.warmup:
                t = clocks.seconds
                rows[mode].append((elapsed, t.get("serve", 0.0), t.get("serve_bwd", 0.0),
                                   t.get("comm_wait", 0.0), t.get("plan", 0.0), cpu,
                                   t.get("serve_cpu", 0.0),
                                   stats["imbalance_before"], stats["imbalance"], stats["loss"]))
    queue.put((rank, {m: dict(zip(CLOCKS, (statistics.median(c) for c in zip(*r))))
                      for m, r in rows.items()}))
    dist.destroy_process_group()


def measure(world: int, args) -> dict[str, list[dict[str, float]]]:
    """{mode: [clocks of rank r]} from ``world`` spawned gloo ranks on 127.0.0.1."""
    from distca.profile.comm import free_port

    port = free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get() for _ in procs)
    for p in procs:
        p.join()
    return {mode: [results[r][mode] for r in range(world)] for mode in MODES}


def ideal_step(ranks: list[dict[str, float]]) -> float:
    """Step time with the colocated run's attention spread evenly and communication free."""
    attn = [r["attn_fwd"] + r["attn_bwd"] for r in ranks]
    rest = [r["step"] - a - r["comm_wait"] for r, a in zip(ranks, attn)]
    return max(rest) + float(np.mean(attn))


def report(world: int, results: dict[str, list[dict[str, float]]]) -> list[str]:
    lines = []
    for mode, ranks in results.items():
        for r, c in enumerate(ranks):
            attn = c["attn_fwd"] + c["attn_bwd"]
            other = c["step"] - attn - c["comm_wait"] - c["plan"]
            lines.append(f"| {world} | {mode} | {r} | {c['step']:.3f} | {c['attn_fwd']:.3f} | "
                         f"{c['attn_bwd']:.3f} | {c['comm_wait']:.3f} "
                         f"({100 * c['comm_wait'] / c['step']:.0f}%) | {c['plan']:.3f} | "
                         f"{other:.3f} | {c['step_cpu']:.3f} | {c['attn_cpu']:.3f} | "
                         f"{c['imb_before']:.2f} | {c['imb_after']:.2f} | "
                         f"{c['loss']:.4f} |")
    step = {m: float(np.mean([c["step"] for c in ranks])) for m, ranks in results.items()}
    bound = step["colocated"] / ideal_step(results["colocated"])
    lines.append("")
    lines.append(f"{world} ranks: ideal bound (colocated / perfectly balanced, free comm) "
                 f"**{bound:.2f}x**")
    busiest = {m: max(c["step_cpu"] for c in ranks) for m, ranks in results.items()}
    wait = {m: float(np.mean([c["comm_wait"] for c in ranks])) for m, ranks in results.items()}
    for mode in ("disaggregated", "disaggregated+pingpong"):
        speedup = step["colocated"] / step[mode]
        exposed = np.mean([c["comm_wait"] / c["step"] for c in results[mode]])
        gain = (f"{100 * (speedup - 1) / (bound - 1):.0f}% of the ideal gain" if bound > 1
                else "the bound leaves no gain")
        lines.append(f"{world} ranks: colocated / {mode} step time **{speedup:.2f}x** "
                     f"({gain}); "
                     f"exposed comm {100 * exposed:.0f}% of step time (mean over ranks); busiest "
                     f"rank's CPU seconds colocated / {mode} "
                     f"{busiest['colocated'] / busiest[mode]:.2f}x")
    lines.append(f"{world} ranks: exposed communication with ping-pong / without (blocking "
                 f"exchanges: every second of communication is exposed) "
                 f"{wait['disaggregated+pingpong']:.3f} s / {wait['disaggregated']:.3f} s = "
                 f"**{100 * wait['disaggregated+pingpong'] / wait['disaggregated']:.0f}%** "
                 f"(mean over ranks; {100 * (1 - wait['disaggregated+pingpong'] / wait['disaggregated']):.0f}% hidden)")
    return lines


def exchange_costs(world: int, args) -> list[str]:
    """Milliseconds per layer of the exchange path's local work (no communication), one process:
    layout from the plan, pack q/k/v, unpack on the server, pack/unpack results, merge (fwd+bwd).
    Seen from rank 0 of ``world`` workers on the skewed batch; median of 9 repeats."""
    from distca.parallel.dispatch import (
        merge_partials,
        pack_qkv,
        pack_results,
        unpack_qkv,
        unpack_results,
    )
    from distca.parallel.planning import StepPlan, plan_within_budget
    from distca.scheduler import ModelShape
    from distca.scheduler.documents import documents_from_batch

    from distca.config import load_config

    torch.set_num_threads(1)
    m = load_config(ROOT / "recipes" / "tiny.yaml", list(args.model)).model
    hq, hkv, d = m.num_attention_heads, m.num_kv_heads, m.hidden_size // m.num_attention_heads
    batch = skewed_batch(world, args.tokens, args.short, 0)
    docs = documents_from_batch(batch.doc_lengths, None, None)
    plan, _, _ = plan_within_budget(docs, world, args.tokens, world, args.tolerance,
                                    args.min_shard, ModelShape(hq, hkv, d, 4), float("inf"))
    step_plan = StepPlan([plan.server_inputs(s) for s in range(world)], 0.0, 0.0)
    q = torch.randn(args.tokens, hq, d, requires_grad=True)
    k, v = (torch.randn(args.tokens, hkv, d, requires_grad=True) for _ in range(2))
    recv = torch.randn(sum(step_plan.layouts(0, world, args.tokens, world, False)
                           .recv_counts_by_rank(hq * d, hkv * d)))

    def timed(fn) -> float:
        times = []
        for _ in range(9):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    layout = step_plan.layouts(0, world, args.tokens, world, False)
    sq, _, _ = unpack_qkv(recv, layout, hq, hkv, d)
    out_s, lse_s = torch.randn(sq.shape[0], hq, d), torch.randn(sq.shape[0], hq)
    rows = layout.merge_index.numel()
    back = torch.randn(rows * hq * (d + 1))
    out_r = torch.randn(rows, hq, d, requires_grad=True)
    lse_r = torch.randn(rows, hq, requires_grad=True)

    def merge():
        out, lse = merge_partials(out_r, lse_r, layout.merge_index, args.tokens)
        (out.sum() + lse.sum()).backward()

    costs = {"layout": timed(lambda: step_plan.layouts(0, world, args.tokens, world, False)),
             "pack q/k/v": timed(lambda: pack_qkv(q, k, v, layout)),
             "unpack q/k/v": timed(lambda: unpack_qkv(recv, layout, hq, hkv, d)),
             "pack out/lse": timed(lambda: pack_results(out_s, lse_s, layout)),
             "unpack out/lse": timed(lambda: unpack_results(back, layout, hq, d)),
             "merge fwd+bwd": timed(merge)}
    return [f"| {world} | {name} | {ms:.2f} |" for name, ms in costs.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per worker")
    parser.add_argument("--short", type=int, default=256, help="length of the short documents")
    parser.add_argument("--tolerance", type=float, default=0.1)
    parser.add_argument("--min-shard", type=int, default=128, help="cad.min_shard_tokens")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--backend", default="auto", choices=["torch", "cpp", "auto"],
                        help="attention.backend of every engine")
    parser.add_argument("--model", nargs="*", default=[],
                        help="extra model.* overrides, e.g. model.num_attention_heads=8")
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages (parallel.pp)")
    parser.add_argument("--micro-batches", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--exchange", action="store_true",
                        help="only time the exchange path's local work per layer (one process)")
    args = parser.parse_args()
    if args.exchange:
        print(f"exchange path, local work per layer on rank 0 (ms, median of 9), tiny model "
              f"{' '.join(args.model)}, {args.tokens} tokens/worker, skewed batch; load average "
              f"{os.getloadavg()[0]:.1f}")
        print("| ranks | step | ms |\n|---|---|---|")
        for world in args.ranks:
            print("\n".join(exchange_costs(world, args)))
        return
    print(f"tiny model {' '.join(args.model)}, pp={args.pp}, {args.micro_batches} "
          f"micro-batch(es) per step, {args.tokens} tokens/worker, one "
          f"{args.tokens}-token document on worker 0, {args.short}-token documents elsewhere, "
          f"eps={args.tolerance}, backend {args.backend}, one torch thread per rank, median of "
          f"{args.steps} steps after {args.warmup} warm-up; load average before: "
          f"{os.getloadavg()[0]:.1f}")
    print()
    print("| ranks | mode | rank | step s | attn fwd s | attn bwd s | comm wait s (% step) | "
          "plan s | other s | step cpu s | attn cpu s | imbalance before | imbalance after | "
          "loss |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    summaries = []
    for world in args.ranks:
        lines = report(world, measure(world, args))
        cut = lines.index("")
        print("\n".join(lines[:cut]), flush=True)
        summaries += lines[cut + 1:]
    print()
    print("\n".join(f"- {s}" for s in summaries))
    print(f"- load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
