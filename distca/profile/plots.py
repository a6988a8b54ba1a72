"""PNG plots of a ``distca profile train`` report: one step's per-rank timeline, and the
attention imbalance over steps."""

from __future__ import annotations

from pathlib import Path

COLORS = {"linear": "#4c72b0", "attention": "#dd8452", "comm": "#c44e52", "other": "#8c8c8c",
          "idle": "#ffffff"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_timeline(report: dict, spans: list, path: str | Path) -> None:
    """One row per rank: what the rank did during the profiled step (blank = idle).

    ``spans[rank]``: [(start_s, end_s, category)] from :func:`distca.profile.breakdown.step_breakdown`.
    """
    from matplotlib.patches import Patch

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.6 * len(spans)))
    for rank, rank_spans in enumerate(spans):
        if not rank_spans:
            continue
        # one call draws the bars in list order: containers first, their insides over them
        start, end, cat = zip(*rank_spans)
        ax.barh([rank] * len(start), [(e - s) * 1e3 for s, e in zip(start, end)],
                left=[s * 1e3 for s in start], height=0.7, color=[COLORS[c] for c in cat],
                linewidth=0)
    ax.set_yticks(range(len(spans)), [f"rank {r}" for r in range(len(spans))])
    ax.invert_yaxis()
    ax.set_xlabel("time since the step started (ms)")
    ax.set_title(f"one training step per rank ({report['world']} ranks, {report['device']}, "
                 "under the torch profiler)")
    handles = [Patch(facecolor=COLORS[c], edgecolor="black" if c == "idle" else COLORS[c],
                     label="idle (blank)" if c == "idle" else c) for c in COLORS]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(spans) < 3
              else -0.2), ncol=len(handles), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_imbalance(report: dict, path: str | Path) -> None:
    """Attention imbalance (max/mean server cost) per measured step, before and after planning."""
    plt = _pyplot()
    rows = report["steps"]
    x = list(range(1, len(rows) + 1))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(x, [r["imbalance_before"] for r in rows], "o-", color="#8c8c8c",
            label="before planning (colocated)")
    ax.plot(x, [r["imbalance_after"] for r in rows], "o-", color="#dd8452",
            label="after planning")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
    ax.set_xlabel("measured step")
    ax.set_ylabel("attention imbalance (max / mean cost, ×)")
    ax.set_ylim(bottom=0.9)
    ax.set_xticks(x)
    ax.legend(frameon=False)
    ax.set_title("attention imbalance across ranks per step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
