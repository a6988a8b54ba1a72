"""``distca simulate``: predicted step time of distca against baselines (scheduler simulator)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distca.commands.options import output_file, require_positive, require_tolerance
from distca.errors import UsageError

_DESCRIPTION = """\
Predicted training step time of distca against packing, variable-length packing, per-document
context parallelism and WLB-LLM, averaged over sampled steps: an analytic model of H200-class
GPUs, or attention at the speed a measured --cost-table gives. Every system runs its pipeline
schedule as an event simulation (1F1B for the colocated ones, distca's lock-step ticks), so
micro-batches with more attention stall the pipeline as they would."""

_EPILOG = """\
--json fields: gpus, dp, tp, pp, micro_batches, model, max_len, tokens_per_worker, batches,
distribution, step_seconds (predicted seconds per step of packing, varlen, per-doc-cp, wlb-llm,
distca, distca-tick: all attention in flight at a tick re-balanced over the ranks, and
distca-job: one plan per job, cad.pipeline_plan=job; the mean over the batches), speedup_vs_packing (packing's step time over each system's),
distca_vs_best_baseline (the fastest baseline's step time over distca's)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="predict step time: distca vs packing, varlen, per-doc CP, WLB-LLM",
                       description=_DESCRIPTION, epilog=_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, required=True, help="GPUs in all: dp × tp × pp")
    p.add_argument("--model", required=True,
                   help="model preset, e.g. llama3-8b; an unknown name lists the known ones")
    p.add_argument("--max-len", type=int, required=True,
                   help="longest document (tokens); a --distribution file's lengths must not "
                   "exceed it")
    p.add_argument("--distribution", default="pretrain",
                   help="pretrain | prolong | a file of lengths (one per line or a JSON list) "
                   "that batches resample (pretrain)")
    p.add_argument("--batches", type=int, default=4, help="batches to average over (4)")
    p.add_argument("--tokens-per-worker", type=int, default=None,
                   help="tokens per data-parallel replica (default: --max-len)")
    p.add_argument("--tp", type=int, default=None, help="tensor parallel (default min(8, gpus))")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel stages (1)")
    p.add_argument("--micro-batches", type=int, default=None,
                   help="micro-batches per data-parallel replica and step, each of "
                   "--tokens-per-worker tokens (default 2 × --pp)")
    p.add_argument("--gpus-per-node", type=int, default=8,
                   help="GPUs per node: NVLink inside one, the network across (8)")
    p.add_argument("--tolerance", type=float, default=0.1,
                   help="the planner's ε: max <= (1+ε)·mean (0.1)")
    p.add_argument("--no-ping-pong", action="store_true", help="dispatch does not overlap compute")
    p.add_argument("--cost-table", default=None,
                   help="a CSV from 'distca profile attention --out' (pairs/s per GPU by task "
                   "shape) instead of the analytic attention speed")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled batches (0)")
    p.add_argument("--json", action="store_true", help="print one JSON object (fields below)")
    p.add_argument("--plot", default=None, help="write a bar chart PNG here")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from distca.commands.plan import load_cost_table
    from distca.presets import MODEL_PRESETS
    from distca.scheduler.distributions import DISTRIBUTIONS, read_lengths
    from distca.scheduler.simulator import Cluster, Hardware, ModelSpec, simulate

    if args.model not in MODEL_PRESETS:
        raise UsageError(f"--model: unknown preset {args.model!r} "
                         f"(known: {', '.join(MODEL_PRESETS)})")
    require_positive(args, "gpus", "max_len", "batches", "pp", "gpus_per_node", "tp",
                     "tokens_per_worker", "micro_batches")
    require_tolerance(args.tolerance)
    distribution = args.distribution
    if distribution not in DISTRIBUTIONS:
        try:
            distribution = read_lengths(distribution)
        except ValueError as exc:
            raise UsageError(f"--distribution: {exc} (or use {', '.join(DISTRIBUTIONS)})") from None
        if distribution.max() > args.max_len:  # sampling would cut them short silently
            raise UsageError(f"--max-len {args.max_len} is below the longest length "
                             f"{distribution.max()} in --distribution {args.distribution}")
    plot = output_file("--plot", args.plot) if args.plot else None
    tp = args.tp or min(8, args.gpus)
    try:
        cluster = Cluster(args.gpus, tp, args.pp, args.gpus_per_node,
                          args.micro_batches or 2 * args.pp)
    except ValueError as exc:
        raise UsageError(f"--gpus: {exc}") from None
    preset = MODEL_PRESETS[args.model]
    model = ModelSpec.of(preset)
    if preset["num_attention_heads"] % tp or preset["num_kv_heads"] % tp:
        which = f"--tp {tp}" if args.tp else f"the default --tp {tp} (min(8, --gpus))"
        raise UsageError(f"{which} does not divide the heads of {args.model} "
                         f"({preset['num_attention_heads']} query, {preset['num_kv_heads']} kv)")
    hw = Hardware(cost_table=load_cost_table(args.cost_table))
    tokens = args.tokens_per_worker or args.max_len
    seconds = simulate(distribution, model, cluster, hw, args.max_len, args.batches, tokens,
                       seed=args.seed, tolerance=args.tolerance, ping_pong=not args.no_ping_pong)
    speedup = {name: seconds["packing"] / value for name, value in seconds.items()}
    report = {"gpus": args.gpus, "dp": cluster.dp, "tp": tp, "pp": args.pp,
              "micro_batches": cluster.micro_batches, "model": args.model,
              "max_len": args.max_len, "tokens_per_worker": tokens, "batches": args.batches,
              "distribution": args.distribution, "step_seconds": seconds,
              "speedup_vs_packing": speedup,
              "distca_vs_best_baseline": min(v for k, v in seconds.items()
                                             if not k.startswith("distca")) / seconds["distca"]}
    if plot:
        _plot(seconds, plot, report)
    if args.json:
        json.dump(report, sys.stdout)
        sys.stdout.write("\n")
        return 0
    print(f"{args.model} on {args.gpus} GPUs (dp={cluster.dp} tp={tp} pp={args.pp}, "
          f"{cluster.micro_batches} micro-batches), "
          f"{args.distribution} lengths up to {args.max_len}, {args.batches} batches")
    for name, value in seconds.items():
        print(f"  {name:<12} {value:9.3f} s/step   x{speedup[name]:.2f} vs packing")
    print(f"distca vs the best baseline: x{report['distca_vs_best_baseline']:.2f}")
    return 0


def _plot(seconds: dict[str, float], path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(seconds)
    ax.bar(names, [seconds[n] for n in names], color=["#999"] * (len(names) - 1) + ["#c33"])
    ax.set_ylabel("predicted step time (s)")
    ax.set_title(f"{report['model']}, {report['gpus']} GPUs, {report['distribution']} "
                 f"≤{report['max_len']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
