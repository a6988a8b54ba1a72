"""The step-time simulator at cluster scale: distca vs WLB-LLM, per-document CP and packing, with pp.

For every (model, distribution, longest document, GPU count, pipeline stages pp) it samples
``--batches`` steps of ``dp × M × max_len`` tokens (``M = --micro-per-stage × pp`` micro-batches
of ``max_len`` tokens per data-parallel replica, tp=8) and predicts each system's step time on the
same documents with :func:`distca.scheduler.simulator.simulate_batch`: colocated systems played
through 1F1B, distca through its lock-step ticks, three times (``distca``: each tick's forward
attention planned over all ranks as the runtime does by default; ``distca-job``: each job planned
alone over all ranks, the runtime's ``cad.pipeline_plan=job``; ``distca-tick``: all attention in
flight at a tick re-balanced against every rank's linear work, backward inputs shipped again, an
idealisation). The CP baselines
are tuned the way their user would: the fastest group size among ``--cp`` on each batch (1 =
packing without CP), at the same memory as distca (a micro-batch slice holds at most ``max_len``
tokens). Ratios are taken on the same batches, side by side.

    .venv/bin/python benchmarks/simulator.py --out benchmarks/results/simulator_table.md \\
        --plot benchmarks/results/simulator.png
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from distca.scheduler.distributions import sample_lengths
from distca.scheduler.simulator import SYSTEMS, Cluster, Hardware, ModelSpec, simulate_batch

from distca.presets import MODEL_PRESETS

K = 1024


def model_spec(preset: str) -> ModelSpec:
    return ModelSpec.of(MODEL_PRESETS[preset])


def run_setting(preset: str, distribution: str, max_len: int, gpus: int, pp: int, micro: int,
                batches: int, seed: int, tolerance: float, cp: tuple[int, ...]) -> dict:
    """Mean predicted step seconds of every system, WLB-LLM's chosen CP sizes (``cp_sizes``),
    distca's worst tick-plan max/mean (``imbalance``) and its mean max/mean attention over the
    ranks in ticks with a backward under the runtime's plans (``backward_imbalance``)."""
    model, cluster, hw = model_spec(preset), Cluster(gpus, 8, pp, micro_batches=micro), Hardware()
    rng = np.random.default_rng(seed)
    totals: dict = dict.fromkeys(SYSTEMS, 0.0)
    chosen, worst, backward = [], 1.0, 0.0
    for _ in range(batches):
        lengths = sample_lengths(rng, distribution, cluster.dp * micro * max_len, max_len)
        step = simulate_batch(lengths, model, cluster, hw, max_len, tolerance, cp=cp, slack=0.0)
        for name, value in step.seconds.items():
            totals[name] += value / batches
        chosen.append(step.cp_size)
        worst = max(worst, step.imbalance)
        backward += step.tick_imbalance["backward"] / batches
    totals["cp_sizes"] = "/".join(map(str, sorted(set(chosen))))
    totals["imbalance"] = worst
    totals["backward_imbalance"] = backward
    return totals


def plot(rows: list[dict], path: str, tolerance: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
    colours = {"llama3-8b": "#4c72b0", "codellama-34b": "#c44e52"}
    for ax, name, title in ((axes[0], "distca", "distca (runtime's tick plans)"),
                            (axes[1], "distca-job", "distca-job (runtime's job plans)"),
                            (axes[2], "distca-tick", "distca-tick (tick re-balanced)")):
        for i, r in enumerate(rows):
            jitter = (i % 12 - 5.5) * 0.02
            ax.plot(r["pp"] + jitter, r["wlb-llm"] / r[name], "o", ms=4, alpha=0.7,
                    color=colours.get(r["model"], "gray"),
                    label=r["model"] if i == rows.index(next(x for x in rows
                                                              if x["model"] == r["model"])) else None)
        ax.axhspan(1.07, 1.35, color="#dd8452", alpha=0.15, label="DistCA paper: 1.07–1.35×")
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
        ax.set_xticks(sorted({r["pp"] for r in rows}))
        ax.set_xlabel("pipeline stages pp")
        ax.set_title(title)
        ax.legend(fontsize=7, frameon=False)
    axes[0].set_ylabel("speedup over WLB-LLM (×)")
    fig.suptitle(f"predicted step-time speedup over WLB-LLM (ε = {tolerance}, tp=8, equal memory)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["llama3-8b", "codellama-34b"])
    parser.add_argument("--distributions", nargs="+", default=["pretrain", "prolong"])
    parser.add_argument("--max-lens", nargs="+", type=int, default=[128 * K, 256 * K, 512 * K])
    parser.add_argument("--gpus", nargs="+", type=int, default=[64, 128, 256, 512])
    parser.add_argument("--pp", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--micro-per-stage", type=int, default=2,
                        help="micro-batches per replica and step = this × pp (2)")
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=0.02,
                        help="distca planner tolerance ε (max <= (1+ε)·mean server cost)")
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="candidate CP group sizes (replicas) of the CP baselines")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the table (markdown) here")
    parser.add_argument("--plot", default=None, help="write the speedup plot (PNG) here")
    args = parser.parse_args()
    start = time.perf_counter()
    lines = [f"{args.batches} batches per setting, tp=8, M = {args.micro_per_stage}·pp "
             f"micro-batches of max-len tokens per replica, distca tolerance ε = "
             f"{args.tolerance}, CP group sizes {args.cp} (fastest per batch); seconds are "
             "predicted step times; speedups are baseline / distca on the same batches",
             "",
             "| model | distribution | max len | GPUs | pp | M | packing s | per-doc CP s | "
             "WLB-LLM s (cp) | distca s | distca-job s | distca-tick s | distca over WLB | "
             "job over WLB | tick over WLB | tick over per-doc CP | tick over packing | "
             "worst plan max/mean | backward ticks max/mean |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for model in args.models:
        for dist in args.distributions:
            for max_len in args.max_lens:
                for gpus in args.gpus:
                    for pp in args.pp:
                        micro = args.micro_per_stage * pp
                        t = run_setting(model, dist, max_len, gpus, pp, micro, args.batches,
                                        args.seed, args.tolerance, tuple(args.cp))
                        rows.append({"model": model, "distribution": dist, "max_len": max_len,
                                     "gpus": gpus, "pp": pp, **t})
                        d, tick, wlb = t["distca"], t["distca-tick"], t["wlb-llm"]
                        job = t["distca-job"]
                        lines.append(
                            f"| {model} | {dist} | {max_len // K}K | {gpus} | {pp} | {micro} | "
                            f"{t['packing']:.1f} | {t['per-doc-cp']:.1f} | {wlb:.1f} "
                            f"({t['cp_sizes']}) | {d:.1f} | {job:.1f} | {tick:.1f} | "
                            f"{wlb / d:.3f} | {wlb / job:.3f} | "
                            f"{wlb / tick:.3f} | {t['per-doc-cp'] / tick:.3f} | "
                            f"{t['packing'] / tick:.3f} | {t['imbalance']:.3f} | "
                            f"{t['backward_imbalance']:.2f} |")
                        print(lines[-1], flush=True)
    lines.append("")
    for pp in args.pp:
        sel = [r for r in rows if r["pp"] == pp]
        for num, den, label in (("wlb-llm", "distca", "distca over WLB-LLM"),
                                ("wlb-llm", "distca-job", "distca-job over WLB-LLM"),
                                ("per-doc-cp", "distca-job", "distca-job over per-doc CP"),
                                ("wlb-llm", "distca-tick", "distca-tick over WLB-LLM"),
                                ("per-doc-cp", "distca-tick", "distca-tick over per-doc CP"),
                                ("packing", "distca-tick", "distca-tick over packing")):
            r = np.array([row[num] / row[den] for row in sel])
            lines.append(f"- pp={pp}: {label}: min {r.min():.3f}x, median {np.median(r):.3f}x, "
                         f"max {r.max():.3f}x over {len(sel)} settings")
            print(lines[-1])
    lines.append(f"- {time.perf_counter() - start:.0f} s to simulate")
    print(lines[-1])
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    if args.plot:
        plot(rows, args.plot, args.tolerance)


if __name__ == "__main__":
    main()
