"""``distca data synth``: write synthetic long-context tasks as chat-format JSONL;
``distca data show``: print the batch of a training step (:mod:`distca.data.show`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distca.commands.options import require_positive
from distca.errors import UsageError
from distca.evals.tasks import SYNTH_SEED, TASKS


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
    from distca.data.synth_chat import write_tasks

    try:
        count = write_tasks(out, args.task, args.length, args.n, args.seed, tokenizer,
                            keys=args.keys)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    print(f"wrote {count} {args.task} examples of ~{args.length} tokens to {out}",
          file=sys.stderr)
    return 0


def run_show(args: argparse.Namespace) -> int:
    import functools
    import json

    from distca.config import DataKind, load_config
    from distca.data import load_tokenizer, make_dataset
    from distca.data.show import describe, render

    require_positive(args, "step")
    cfg = load_config(args.recipe, args.overrides)
    try:
        batches = make_dataset(cfg).step_batches(args.step)  # as the training driver calls it
    except (OSError, ValueError) as exc:
        raise UsageError(f"{args.recipe}: {exc}") from None
    shown = [describe(b) for b in batches]
    if args.json:
        json.dump({"recipe": args.recipe, "step": args.step, "micro_batches": shown}, sys.stdout)
        sys.stdout.write("\n")
        return 0
    decode = None  # synthetic token ids are not text
    if cfg.data.kind is not DataKind.synthetic:
        # special tokens shown: the template's markers are part of what is trained on
        decode = functools.partial(load_tokenizer(cfg.data.tokenizer).decode,
                                   skip_special_tokens=False)
    print(f"step {args.step} of {args.recipe}: {len(shown)} micro-batch(es); loss targets "
          f"(tokens that a label predicts) are marked \u27e6 \u27e7")
    for m, batch in enumerate(shown):
        print(f"== micro-batch {m}: {batch['ranks']} ranks x {batch['tokens_per_rank']} tokens, "
              f"{len(batch['documents'])} documents, {batch['loss_tokens']} loss tokens, "
              f"{batch['padding']} padding")
        for d, doc in enumerate(batch["documents"]):
            turns = f", {len(doc['turns'])} turns" if "turns" in doc else ""
            print(f"-- document {d}: tokens {doc['start']}..{doc['start'] + doc['length']}{turns}")
            print(render(doc, decode))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="data tools: inspect a step's batch, synthetic tasks")
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

    show = actions.add_parser("show", help="print the global batch of a training step, built "
                              "as training builds it")
    show.add_argument("recipe", help="a recipe YAML, e.g. recipes/tiny-focusft.yaml")
    show.add_argument("overrides", nargs="*", metavar="key=value",
                      help="config overrides, as for 'distca train'")
    show.add_argument("--step", type=int, default=1, help="the training step (1-based; 1)")
    show.add_argument("--json", action="store_true", help="print JSON: per micro-batch its "
                      "documents with token ids, labels (-100: no loss) and turns")
    show.set_defaults(run=run_show)
