"""``distca memory RECIPE [key=value ...] [--json]``: the largest rank's predicted peak memory.

The model is :mod:`distca.memory.estimate`; a device is the recipe's
``trainer.device_memory_gib``. Exit code 0 when it fits (or names no device), 1 when it does
not, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json

_EPILOG = """\
--json fields: per_rank_gib (predicted peak of the largest rank), device_gib (the recipe's
trainer.device_memory_gib, null when it names none), fits, largest_part, stage (the pipeline
stage of that rank), parts (GiB each: weights, gradients, optimizer, activations,
attention_buffers, logits, fast_weights, update_buffers; the peak phase's, the others 0),
fixes (single overrides predicted to fit, when it does not), notes."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("memory", help="predicted peak memory of RECIPE's largest rank, by part",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="a recipe YAML, e.g. recipes/llama3-8b-128k.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--json", action="store_true", help="print one JSON object (fields below)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from distca.config import load_config
    from distca.memory.attention import attention_bytes_per_layer
    from distca.memory.estimate import GIB, estimate
    from distca.memory.fit import describe, fixes

    cfg = load_config(args.recipe, args.overrides)
    attention = attention_bytes_per_layer(cfg)
    est = estimate(cfg, attention)
    found = [] if est.fits else fixes(cfg, attention)
    if args.json:
        print(json.dumps({**est.as_dict(), "fixes": found}, indent=2))
        return 0 if est.fits else 1
    m = cfg.model
    print(f"{args.recipe}: {m.preset or 'custom'} model, recompute={m.recompute.value}, "
          f"tp={cfg.parallel.tp} pp={cfg.parallel.pp} dp={cfg.parallel.dp}, "
          f"{cfg.data.tokens_per_rank} tokens a rank, {cfg.trainer.precision.value}")
    for name, value in est.parts.items():
        print(f"  {name:<18} {value / GIB:8.2f} GiB")
    print(f"  {'total':<18} {est.per_rank_gib:8.2f} GiB  (pipeline stage {est.stage})")
    print(describe(est) + ("" if est.fits else " — does NOT fit"))
    for line in found:
        print(f"  predicted to fit: {line}")
    for note in est.notes:
        print(f"  note: {note}")
    return 0 if est.fits else 1
