"""The step-time simulator at cluster scale: distca vs per-document CP vs plain packing.

For every (model, distribution, longest document, GPU count) it samples ``--batches`` batches
of ``dp × max_len`` tokens (one max-length micro-batch per data-parallel replica, tp=8, pp=1)
and predicts each system's step time on the same batches with
:func:`distca.scheduler.simulator.simulate_batch`; distca is predicted twice, with its dispatch
overlapped by ping-pong and without. The per-document CP baseline is tuned the way its user
would: the fastest group size among ``--cp`` on each batch, with each replica holding at most
``max_len`` tokens like distca's (documents that fit nowhere overfill the emptiest group), and
again with 25% more tokens allowed per replica (more memory than distca gets). Ratios are taken
on the same batches, side by side.

    .venv/bin/python benchmarks/simulator.py --out benchmarks/results/simulator_table.md \\
        --plot benchmarks/results/simulator.png
"""

from __future__ import annotations

import argparse
import functools
import time

import numpy as np
from distca.scheduler.distributions import sample_lengths
from distca.scheduler.simulator import Cluster, Hardware, ModelSpec, simulate_batch

from distca.config import MODEL_PRESETS

K = 1024


def model_spec(preset: str) -> ModelSpec:
    p = MODEL_PRESETS[preset]
    return ModelSpec(p["num_layers"], p["hidden_size"], p["num_attention_heads"],
                     p["num_kv_heads"], p["ffn_hidden_size"])


def run_setting(preset: str, distribution: str, max_len: int, gpus: int, batches: int,
                seed: int, tolerance: float, cp: tuple[int, ...]) -> dict[str, float]:
    """Mean predicted step seconds of packing, per-doc-cp (equal memory and +25% tokens),
    distca and distca without ping-pong; ``cp_sizes``: the CP group size each batch chose."""
    model, cluster, hw = model_spec(preset), Cluster(gpus, tp=8), Hardware()
    rng = np.random.default_rng(seed)
    names = ("packing", "per-doc-cp", "per-doc-cp-slack", "distca", "distca-no-pp")
    totals: dict = dict.fromkeys(names, 0.0)
    chosen = []
    for _ in range(batches):
        lengths = sample_lengths(rng, distribution, cluster.dp * max_len, max_len)
        run = functools.partial(simulate_batch, lengths, model, cluster, hw, max_len, tolerance,
                                cp=cp)
        with_pp = run(ping_pong=True, varlen_slack=0.0)
        without = run(ping_pong=False, varlen_slack=0.0)
        slack = run(ping_pong=True, varlen_slack=0.25)
        for name in ("packing", "per-doc-cp", "distca"):
            totals[name] += with_pp.seconds[name] / batches
        totals["distca-no-pp"] += without.seconds["distca"] / batches
        totals["per-doc-cp-slack"] += slack.seconds["per-doc-cp"] / batches
        chosen.append(with_pp.cp_size)
    totals["cp_sizes"] = "/".join(map(str, sorted(set(chosen))))
    return totals


def plot(rows: list[dict], path: str, tolerance: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dists = sorted({r["distribution"] for r in rows})
    fig, axes = plt.subplots(1, len(dists), figsize=(6 * len(dists), 4), sharey=True,
                             squeeze=False)
    for ax, dist in zip(axes[0], dists):
        keys = sorted({(r["model"], r["max_len"]) for r in rows if r["distribution"] == dist})
        for model, max_len in keys:
            sel = sorted((r for r in rows if (r["distribution"], r["model"], r["max_len"])
                          == (dist, model, max_len)), key=lambda r: r["gpus"])
            ax.plot([r["gpus"] for r in sel], [r["per-doc-cp"] / r["distca"] for r in sel],
                    "o-", label=f"{model}, {max_len // K}K")
        ax.axhspan(1.07, 1.35, color="#dd8452", alpha=0.15, label="DistCA paper: 1.07–1.35×")
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("GPUs (tp=8)")
        ax.set_title(f"{dist} documents")
        ax.legend(fontsize=7, frameon=False)
    axes[0][0].set_ylabel("speedup of distca over per-document CP (×)")
    fig.suptitle(f"predicted step-time speedup (simulator, ping-pong on, distca ε = {tolerance}, "
                 "CP at its best group size, equal tokens per replica)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["llama3-8b", "codellama-34b"])
    parser.add_argument("--distributions", nargs="+", default=["pretrain", "prolong"])
    parser.add_argument("--max-lens", nargs="+", type=int, default=[128 * K, 256 * K, 512 * K])
    parser.add_argument("--gpus", nargs="+", type=int, default=[16, 32, 64, 128, 256, 512])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--tolerance", type=float, default=0.02,
                        help="distca planner tolerance ε (max <= (1+ε)·mean server cost)")
    parser.add_argument("--cp", type=int, nargs="+", default=[2, 4, 8],
                        help="candidate per-document CP group sizes (replicas)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the table (markdown) here")
    parser.add_argument("--plot", default=None, help="write the speedup plot (PNG) here")
    args = parser.parse_args()
    start = time.perf_counter()
    lines = [f"{args.batches} batches per setting, tp=8, pp=1, distca tolerance ε = "
             f"{args.tolerance}, per-document CP group sizes {args.cp} (fastest per batch), one "
             "max-length micro-batch per replica; seconds are predicted step times; speedups "
             "are baseline / distca",
             "",
             "| model | distribution | max len | GPUs | packing s | per-doc CP s (cp) | distca s | "
             "distca no ping-pong s | over CP | over CP +25% tokens | over packing | "
             "no-pp over CP |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for model in args.models:
        for dist in args.distributions:
            for max_len in args.max_lens:
                for gpus in args.gpus:
                    t = run_setting(model, dist, max_len, gpus, args.batches, args.seed,
                                    args.tolerance, tuple(args.cp))
                    rows.append({"model": model, "distribution": dist, "max_len": max_len,
                                 "gpus": gpus, **t})
                    d = t["distca"]
                    lines.append(
                        f"| {model} | {dist} | {max_len // K}K | {gpus} | {t['packing']:.2f} | "
                        f"{t['per-doc-cp']:.2f} ({t['cp_sizes']}) | {d:.2f} | "
                        f"{t['distca-no-pp']:.2f} | {t['per-doc-cp'] / d:.3f} | "
                        f"{t['per-doc-cp-slack'] / d:.3f} | {t['packing'] / d:.3f} | "
                        f"{t['per-doc-cp'] / t['distca-no-pp']:.3f} |")
                    print(lines[-1], flush=True)
    lines.append("")
    for key, label in (("per-doc-cp", "per-document CP"),
                       ("per-doc-cp-slack", "per-document CP with +25% tokens"),
                       ("packing", "packing")):
        r = np.array([row[key] / row["distca"] for row in rows])
        lines.append(f"- distca over {label}: min {r.min():.3f}x, median {np.median(r):.3f}x, "
                     f"max {r.max():.3f}x over {len(rows)} settings")
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
