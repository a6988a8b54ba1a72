"""The one command line: ``distca <subcommand> …``.

Each capability registers one subcommand here when it works. Subcommand modules are imported
only when their subcommand runs, so ``distca --help`` stays fast and never imports torch.
Exit codes: 0 success, 1 runtime failure, 2 bad input (a usage or configuration error).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from distca.errors import UsageError


def _config_show(args: argparse.Namespace) -> int:
    from distca.config import load_config, to_yaml

    cfg = load_config(args.recipe, args.overrides)
    sys.stdout.write(to_yaml(cfg))
    return 0


def _add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="inspect recipes: print the resolved, validated config")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="print RECIPE plus overrides as resolved YAML")
    show.add_argument("recipe", help="a recipe YAML, e.g. recipes/tiny.yaml")
    show.add_argument("overrides", nargs="*", metavar="key=value")
    show.set_defaults(run=_config_show)


def _add_data(sub: argparse._SubParsersAction) -> None:
    from distca.commands import data  # stdlib-only module: cheap at start-up

    data.add_parser(sub)


def _train(args: argparse.Namespace) -> int:
    from distca.commands import train

    return train.run(args)


def _config_sections() -> str:
    """The config tree's sections and what each holds, for ``distca train --help``."""
    import textwrap
    from dataclasses import fields

    from distca.config import DistcaConfig

    return "\n".join(textwrap.fill(", ".join(g.name for g in fields(f.default_factory)),
                                   width=100, initial_indent=f"  {f.name:<10} ",
                                   subsequent_indent=" " * 13)
                     for f in fields(DistcaConfig))


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train RECIPE on a local Ray cluster or the given one",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train RECIPE (a YAML path, or the name of a shipped recipe such as "
                    "tiny.yaml) with key=value overrides, e.g. trainer.steps=10.",
        epilog="config sections and their keys (every key with its value: "
               "distca config show RECIPE):\n" + _config_sections())
    p.add_argument("recipe", help="a recipe YAML, e.g. recipes/tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. trainer.steps=10 data.paths=my.jsonl")
    p.set_defaults(run=_train)


def _add_profile(sub: argparse._SubParsersAction) -> None:
    from distca.commands import profile  # torch loads only when a measurement runs

    profile.add_parser(sub)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    from distca.commands import plan  # numpy and the scheduler load only when it runs

    plan.add_parser(sub)


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    from distca.commands import simulate

    simulate.add_parser(sub)


def _add_hf(sub: argparse._SubParsersAction) -> None:
    from distca.commands import hf  # torch and transformers load only when a conversion runs

    hf.add_parsers(sub)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from distca.commands import eval as eval_command  # the model loads only when it runs

    eval_command.add_parser(sub)


def _add_memory(sub: argparse._SubParsersAction) -> None:
    from distca.commands import memory  # torch and the estimator load only when it runs

    memory.add_parser(sub)


# Each entry adds one subcommand; later capabilities append theirs.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_config, _add_data,
                                                                   _add_train, _add_profile,
                                                                   _add_plan, _add_simulate,
                                                                   _add_hf, _add_eval,
                                                                   _add_memory]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distca",
        description="Disaggregated core attention for long-context training.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from distca.config import ConfigError

    for arg in sys.argv[1:] if argv is None else argv:
        key = arg[2:].split("=", 1)[0]
        if arg.startswith("--") and "." in key:  # no flag has a dot: a config key was meant
            print(f"distca: error: {arg}: config overrides take no dashes; write {arg[2:]}"
                  + ("" if "=" in arg else "=VALUE"), file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ConfigError, UsageError) as exc:
        print(f"distca: error: {exc}", file=sys.stderr)
        return 2


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
