"""``distca profile …``: measure the present device and write tables the planner can read."""

from __future__ import annotations

import argparse
import json
import sys

from distca.cli import UsageError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_sizes(text: str) -> list[int]:
    """'4K,1M,16M' -> byte counts; bad items raise UsageError naming them."""
    sizes = []
    for item in text.split(","):
        item = item.strip().upper().removesuffix("B")
        unit = item[-1:] if item[-1:] in _UNITS else ""
        try:
            value = int(item[: len(item) - len(unit)]) * _UNITS[unit]
        except ValueError:
            raise UsageError(f"--sizes: {item!r} is not a byte count like 64K or 4M") from None
        if value < 1:
            raise UsageError(f"--sizes: {item!r} must be positive")
        sizes.append(value)
    return sizes


def run_comm(args: argparse.Namespace) -> int:
    from distca.profile.comm import profile_comm

    sizes = parse_sizes(args.sizes)
    if args.world < 2 or args.iters < 1:
        raise UsageError(f"--world must be >= 2 and --iters >= 1 (got {args.world}, {args.iters})")
    result = profile_comm(args.world, sizes, args.iters)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="measure this device (communication bandwidth, …)")
    actions = p.add_subparsers(dest="action", required=True, metavar="WHAT")
    comm = actions.add_parser("comm", help="all-to-all bandwidth per message size (JSON)")
    comm.add_argument("--world", type=int, default=2, help="local processes (default 2)")
    comm.add_argument("--sizes", default="64K,1M,16M", help="bytes each rank sends, e.g. 64K,1M")
    comm.add_argument("--iters", type=int, default=5)
    comm.set_defaults(run=run_comm)
