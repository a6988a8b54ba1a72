"""``distca plan``: plan one batch of documents over attention servers and report its quality."""

from __future__ import annotations

import argparse
import json
import math
import sys

from distca.commands.options import require_positive, require_tolerance
from distca.errors import UsageError

MAX_SERVERS = 65536  # more attention servers than any cluster has GPUs

_DESCRIPTION = """\
Plan one batch's core attention over attention servers and report its quality.

The documents lie back to back on workers of --tokens-per-worker tokens each (the linear layers'
layout); worker w is also attention server w, and servers beyond the workers are dedicated ones
holding no tokens. Work is counted in score pairs (query-key pairs a causal mask keeps); the
imbalance is the busiest server's cost over the mean, before planning (every task on the worker
holding its queries) and after."""

_EPILOG = """\
--json fields: planner, tolerance, num_documents, num_workers, tokens_per_worker, num_servers,
total_pairs (score pairs of the batch), imbalance_before and imbalance (max/mean of server cost,
colocated and planned), server_cost (score pairs per server), bytes_moved (forward dispatch bytes
per layer for --model), num_tasks (CA-tasks in the plan), plan_ms (planning wall time)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="plan one batch's core attention over servers (ε-balanced)",
                       description=_DESCRIPTION, epilog=_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--lengths", help="document lengths in packed order, e.g. 16384,8192,8192")
    src.add_argument("--lengths-file", help="a file of lengths: one integer per line or a JSON list")
    p.add_argument("--servers", type=int, required=True,
                   help="attention servers, the workers included")
    p.add_argument("--tolerance", type=float, default=0.1, help="ε: max <= (1+ε)·mean (0.1)")
    p.add_argument("--tokens-per-worker", type=int, default=None,
                   help="linear-layer tokens per worker (default: the batch split over --servers)")
    p.add_argument("--min-shard", type=int, default=128,
                   help="fewest query rows and kv columns a cut leaves in a piece (128)")
    p.add_argument("--planner", choices=("distca", "greedy-baseline"), default="distca",
                   help="distca: the communication-aware planner; greedy-baseline: the reference "
                   "system's greedy, for comparison (distca)")
    p.add_argument("--model", default="llama3-8b",
                   help="model preset (a recipe's model.preset) whose heads set the bytes "
                   "moved; an unknown name lists the known ones (llama3-8b)")
    p.add_argument("--cost-table", default=None,
                   help="a CSV from 'distca profile attention --out': the distca planner "
                   "balances its predicted seconds (causal rows) instead of score pairs")
    p.add_argument("--json", action="store_true", help="print one JSON object (fields below)")
    p.set_defaults(run=run)


def parse_lengths(text: str) -> list[int]:
    from distca.scheduler.distributions import parse_length

    if not text.strip():
        raise UsageError("--lengths: no lengths given (e.g. --lengths 16384,8192,8192)")
    items = text.split(",")
    try:
        return [parse_length(item, f"--lengths item {i + 1}") for i, item in enumerate(items)]
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def model_shape(preset: str):
    from distca.presets import MODEL_PRESETS
    from distca.scheduler.sim_model import ModelSpec

    if preset not in MODEL_PRESETS:
        raise UsageError(f"--model: unknown preset {preset!r} (known: {', '.join(MODEL_PRESETS)})")
    return ModelSpec.of(MODEL_PRESETS[preset]).shape


def load_cost_table(path: str | None):
    if path is None:
        return None
    from distca.scheduler import CostTable

    try:
        return CostTable.from_csv(path)
    except ValueError as exc:
        raise UsageError(f"--cost-table: {exc}") from None


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from distca.scheduler import documents_from_batch, timed_plan_step
    from distca.scheduler.distributions import MAX_LENGTH, read_lengths

    if args.lengths is not None:
        lengths = parse_lengths(args.lengths)
    else:
        try:
            lengths = [int(x) for x in read_lengths(args.lengths_file)]
        except ValueError as exc:
            raise UsageError(f"--lengths-file: {exc}") from None
    require_positive(args, "servers", "min_shard", "tokens_per_worker")
    if args.servers > MAX_SERVERS:  # the planner's arrays grow with it: 10**7 took 36 s, 2.8 GB
        raise UsageError(f"--servers {args.servers}: at most {MAX_SERVERS}")
    require_tolerance(args.tolerance)
    total = sum(lengths)
    if total > MAX_LENGTH:
        raise UsageError(f"the documents hold {total} tokens, more than {MAX_LENGTH} (score-pair "
                         "counts would overflow int64)")
    per_worker = args.tokens_per_worker or math.ceil(total / args.servers)
    workers = math.ceil(total / per_worker)
    if workers > args.servers:
        raise UsageError(f"--tokens-per-worker {per_worker}: {total} tokens need {workers} "
                         f"workers, more than --servers {args.servers}")
    if args.cost_table and args.planner != "distca":
        raise UsageError(f"--cost-table: --planner {args.planner} balances score pairs only and "
                         "would ignore it")
    shape, table = model_shape(args.model), load_cost_table(args.cost_table)
    plan, ms = timed_plan_step(documents_from_batch(lengths), workers, per_worker, args.servers,
                               tolerance=args.tolerance, min_shard_tokens=args.min_shard,
                               model=shape, planner=args.planner, cost_table=table)
    report = {
        "planner": args.planner, "tolerance": args.tolerance, "num_documents": len(lengths),
        "num_workers": workers, "tokens_per_worker": per_worker, "num_servers": args.servers,
        "total_pairs": int(plan.server_cost.sum()),
        "imbalance_before": plan.imbalance_before, "imbalance": plan.imbalance,
        "server_cost": [int(x) for x in plan.server_cost], "bytes_moved": plan.bytes_moved,
        "num_tasks": int(plan.tasks.size), "plan_ms": ms,
    }
    if args.json:
        json.dump(report, sys.stdout)
        sys.stdout.write("\n")
        return 0
    cost = np.asarray(plan.server_cost, dtype=np.float64)
    # "planner distca:", not "distca:", which reads as the program's error prefix
    print(f"planner {args.planner}: {len(lengths)} document(s), {total} tokens on {workers} "
          f"worker(s) x {per_worker}, {args.servers} server(s), ε={args.tolerance}")
    print(f"imbalance {plan.imbalance_before:.4f} -> {plan.imbalance:.4f} (max/mean score pairs)")
    print(f"bytes moved {plan.bytes_moved / 2**20:.1f} MiB per layer, {plan.tasks.size} tasks, "
          f"planned in {ms:.1f} ms")
    print("server cost / mean: " + " ".join(f"{x:.3f}" for x in cost / cost.mean()))
    return 0
