"""``distca profile …``: measure the present device and write tables the planner can read."""

from __future__ import annotations

import argparse
import json
import sys

from distca.commands.options import output_file, require_positive
from distca.errors import UsageError

_BYTE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_TOKEN_UNITS = {"": 1, "K": 1 << 10}


def _parse_counts(flag: str, text: str, units: dict[str, int], strip: str, what: str) -> list[int]:
    """Comma-separated positive counts with an optional unit letter; bad items raise UsageError
    naming the flag and the item."""
    counts = []
    for raw in text.split(","):
        item = raw.strip().upper().removesuffix(strip)
        unit = item[-1:] if item[-1:] in units else ""
        try:
            value = int(item[: len(item) - len(unit)]) * units[unit]
        except ValueError:
            raise UsageError(f"{flag}: {raw.strip()!r} is not {what}") from None
        if value < 1:
            raise UsageError(f"{flag}: {raw.strip()!r} must be positive")
        counts.append(value)
    return counts


def parse_sizes(text: str) -> list[int]:
    """'4K,1M,16M' -> byte counts."""
    return _parse_counts("--sizes", text, _BYTE_UNITS, "B", "a byte count like 64K or 4M")


def run_comm(args: argparse.Namespace) -> int:
    from distca.profile.comm import profile_comm

    sizes = parse_sizes(args.sizes)
    if args.world < 2 or args.iters < 1:
        raise UsageError(f"--world must be >= 2 and --iters >= 1 (got {args.world}, {args.iters})")
    out = output_file("--out", args.out) if args.out else None
    result = profile_comm(args.world, sizes, args.iters)
    if out:
        out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"all-to-all over {args.world} local processes, {args.iters} timed exchanges per size")
    for row in result["rows"]:
        print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in row.items()))
    if out:
        print(f"table: {out}")
    return 0


def parse_lengths(flag: str, text: str) -> list[int]:
    """'64,256,1K' -> token counts."""
    return _parse_counts(flag, text, _TOKEN_UNITS, "", "a token count like 256 or 4K")


def run_attention(args: argparse.Namespace) -> int:
    from distca.presets import MODEL_PRESETS

    if args.model not in MODEL_PRESETS:
        raise UsageError(f"--model: unknown preset {args.model!r} "
                         f"(known: {', '.join(MODEL_PRESETS)})")
    m = MODEL_PRESETS[args.model]
    if args.tp < 1 or m["num_attention_heads"] % args.tp or m["num_kv_heads"] % args.tp:
        raise UsageError(f"--tp {args.tp} does not divide the heads of {args.model} "
                         f"({m['num_attention_heads']} query, {m['num_kv_heads']} kv)")
    heads, kv_heads = m["num_attention_heads"] // args.tp, m["num_kv_heads"] // args.tp
    require_positive(args, "min_pairs", "repeats", "threads")
    if args.clock == "cpu":  # CPU seconds of several threads add up: not a core's work
        if args.threads not in (None, 1):
            raise UsageError(f"--clock cpu times one thread, got --threads {args.threads} "
                             "(use --threads 1, or --clock wall)")
        args.threads = 1
    q_lens, kv_lens = parse_lengths("--q-lens", args.q_lens), parse_lengths("--kv-lens", args.kv_lens)
    masks = [m.strip() for m in args.masks.split(",")]
    out = output_file("--out", args.out) if args.out else None
    import torch

    from distca.profile.attention import MASKS, profile_attention, write_table

    if not set(masks) <= set(MASKS):
        raise UsageError(f"--masks: {args.masks!r}: choose from {', '.join(MASKS)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        result = profile_attention(q_lens, kv_lens, masks, heads, kv_heads,
                                   m["hidden_size"] // m["num_attention_heads"], args.backend,
                                   min_pairs=args.min_pairs, reps=args.repeats,
                                   clock=args.clock)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"--backend {args.backend}: {exc}") from None
    result["model"], result["tp"] = args.model, args.tp
    if out:
        write_table(result["rows"], out)
        result["table"] = str(out)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"core attention fwd+bwd, {args.model} heads {heads}/{kv_heads} (tp={args.tp}), "
          f"backend {result['backend']}, {result['dtype']}, {result['device']}, "
          f"{result['threads']} threads")
    print(f"{'mask':<7} {'q_len':>6} {'kv_len':>7} {'Mpairs/s':>10} {'TFLOP/s':>9}")
    for r in result["rows"]:
        print(f"{r['mask']:<7} {r['q_len']:>6} {r['kv_len']:>7} {r['pairs_per_s'] / 1e6:>10.2f} "
              f"{r['tflops']:>9.4f}")
    if args.out:
        print(f"table: {args.out}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from distca.config import load_config

    if args.steps < 1 or args.warmup < 0:
        raise UsageError(f"--steps must be >= 1 and --warmup >= 0 (got {args.steps}, "
                         f"{args.warmup})")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise UsageError(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    cfg = load_config(args.recipe, args.overrides)
    out = Path(args.out) if args.out else \
        Path("runs") / f"profile-{Path(args.recipe).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} exists and is not a directory")
    from distca.profile.plots import plot_imbalance, plot_timeline
    from distca.profile.train import profile_train

    out.mkdir(parents=True, exist_ok=True)
    try:
        report = profile_train(cfg, args.steps, args.warmup, args.peak_tflops, str(out))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{args.recipe}: {exc}") from None
    report["traces"] = [str(out / f"trace_rank{r}.json") for r in range(report["world"])]
    spans = report.pop("spans")  # bulky: its own file
    report.update(timeline_png=str(out / "timeline.png"), imbalance_png=str(out / "imbalance.png"),
                  spans_json=str(out / "spans.json"))
    plot_timeline(report, spans, report["timeline_png"])
    plot_imbalance(report, report["imbalance_png"])
    (out / "spans.json").write_text(json.dumps(spans) + "\n")
    (out / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="measure this device: attention, communication, training")
    actions = p.add_subparsers(dest="action", required=True, metavar="WHAT")
    comm = actions.add_parser("comm", help="all-to-all bandwidth per message size (JSON)")
    comm.add_argument("--world", type=int, default=2, help="local processes (default 2)")
    comm.add_argument("--sizes", default="64K,1M,16M", help="bytes each rank sends, e.g. 64K,1M")
    comm.add_argument("--iters", type=int, default=5, help="timed exchanges per size (5)")
    comm.add_argument("--json", action="store_true", help="print the result as JSON")
    comm.add_argument("--out", default=None, help="also write the result (JSON) to this file")
    comm.set_defaults(run=run_comm)

    attn = actions.add_parser("attention", help="core-attention throughput per task shape "
                              "(the planner's cost table)")
    attn.add_argument("--backend", default="auto", choices=["auto", "cpp", "torch", "flash",
                                                            "flex"],
                      help="attention kernels to time (auto: the best on this device)")
    attn.add_argument("--model", default="tiny", help="preset giving heads and head dim (tiny)")
    attn.add_argument("--tp", type=int, default=1, help="tensor parallel: heads per GPU (1)")
    attn.add_argument("--q-lens", default="64,256,1K", help="query lengths (64,256,1K)")
    attn.add_argument("--kv-lens", default="64,256,1K,4K", help="key lengths (64,256,1K,4K)")
    attn.add_argument("--masks", default="causal,full",
                      help="masks to time, causal and/or full (causal,full)")
    attn.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    attn.add_argument("--min-pairs", type=int, default=1 << 20,
                      help="score pairs per timed call: identical tasks are batched up to it "
                      "(within 64K query + key tokens)")
    attn.add_argument("--repeats", type=int, default=3,
                      help="timed passes per point; the table keeps their median (3)")
    attn.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                      help="wall seconds, or this process's CPU seconds (CPU, one thread, "
                      "which cpu implies: unaffected by other jobs on the machine)")
    attn.add_argument("--out", default=None, help="write the cost table CSV here: q_len, kv_len, "
                      "mask, pairs_per_s, seconds_per_task, tflops (what plan and simulate "
                      "--cost-table read)")
    attn.add_argument("--json", action="store_true",
                      help="print the result as JSON: device, backend, shape and the table's rows")
    attn.set_defaults(run=run_attention)

    train = actions.add_parser("train", help="real training steps: tokens/s, MFU, per-rank "
                               "breakdown, imbalance (JSON + PNG plots)")
    train.add_argument("recipe", help="a recipe YAML, e.g. recipes/tiny.yaml")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="config overrides, as for 'distca train'")
    train.add_argument("--steps", type=int, default=3, help="measured steps (3)")
    train.add_argument("--warmup", type=int, default=1, help="untimed steps first (1)")
    train.add_argument("--peak-tflops", type=float, default=None,
                       help="peak TFLOP/s per rank for MFU (default: a measured matmul)")
    train.add_argument("--out", default=None, help="directory for profile.json, the plots, "
                       "spans.json and trace_rank<r>.json (Chrome/Perfetto trace of the profiled "
                       "step; default runs/profile-<recipe>-<time>)")
    train.set_defaults(run=run_train)
