"""``distca data synth``: write synthetic long-context tasks as chat-format JSONL."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from distca.cli import UsageError
from distca.evals.tasks import SYNTH_SEED, TASKS, generate


def run_synth(args: argparse.Namespace) -> int:
    from distca.data.tokenizer import load_tokenizer

    if args.length < 1 or args.n < 1 or args.keys < 1:
        raise UsageError(f"--length, --n and --keys must be >= 1 "
                         f"(got {args.length}, {args.n}, {args.keys})")
    if args.keys > 1 and args.task != "niah":
        raise UsageError(f"--keys applies to --task niah only (got --task {args.task})")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: directory {out.parent} does not exist")
    if out.is_dir():
        raise UsageError(f"--out {out}: is a directory (give a .jsonl file path)")
    try:
        tokenizer = load_tokenizer(args.tokenizer)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--tokenizer {args.tokenizer}: {exc}") from exc
    try:
        examples = generate(args.task, args.length, args.n, args.seed,
                            lambda text: len(tokenizer.encode(text)), keys=args.keys)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w") as f:
        for example in examples:
            f.write(json.dumps(example.to_chat()) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(out)
    print(f"wrote {len(examples)} {args.task} examples of ~{args.length} tokens to {out}",
          file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="data tools: synthetic long-context tasks")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    synth = actions.add_parser("synth", help="write synthetic long-context tasks (chat JSONL)")
    synth.add_argument("--task", required=True, choices=TASKS)
    synth.add_argument("--length", type=int, required=True, help="target prompt tokens")
    synth.add_argument("--n", type=int, required=True, help="number of examples")
    synth.add_argument("--seed", type=int, default=SYNTH_SEED)
    synth.add_argument("--keys", type=int, default=1, help="needles for niah (>1: multi-key)")
    synth.add_argument("--tokenizer", default=None,
                       help="local HF tokenizer directory (default: built-in byte-level)")
    synth.add_argument("--out", required=True, help="output .jsonl path")
    synth.set_defaults(run=run_synth)
