"""Reading one recipe YAML into a mapping of config sections, before it is merged and checked
(:mod:`distca.config`).

A recipe is a path; one that does not exist there is looked up by name among the recipes
shipped inside the package (``distca/recipes``), so an installed distca runs
``distca train tiny.yaml`` (or ``recipes/tiny.yaml``) from any directory.

It is read safely: UTF-8 text, YAML, a mapping, and a bound on what aliases expand to. A YAML
alias is a reference, so a few lines can describe billions of values ("billion laughs");
``yaml.safe_load`` builds them lazily, shared, but merging them into the config tree copies
every one and never finishes. :func:`read_yaml` counts the values as the tree would hold them
and refuses a file past :data:`MAX_VALUES` before anything copies it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

MAX_VALUES = 100_000  # a real recipe has a few hundred


class RecipeFileError(ValueError):
    """The file is not UTF-8 YAML of a sane size; the message says where."""


def _count(node: Any, budget: int) -> int:
    """Values under ``node`` once aliases are expanded, stopping as soon as ``budget`` is hit."""
    if isinstance(node, dict):
        items = list(node.keys()) + list(node.values())
    elif isinstance(node, list):
        items = node
    else:
        return 1
    total = 1
    for item in items:
        total += _count(item, budget - total)
        if total > budget:
            break
    return total


def read_yaml(data: bytes) -> Any:
    """The YAML document in ``data``; raises :class:`RecipeFileError` naming the byte offset
    of bad UTF-8, the YAML error, or the expansion past :data:`MAX_VALUES`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeFileError(f"not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r}); "
                              f"a recipe is a YAML file") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeFileError(f"not valid YAML: {exc}") from None
    if _count(raw, MAX_VALUES) > MAX_VALUES:
        raise RecipeFileError(f"expands to more than {MAX_VALUES} values (YAML aliases "
                              f"repeating each other?)")
    return raw


def _recipe_bytes(path: Path) -> bytes | None:
    if path.is_file():
        return path.read_bytes()
    shipped = resources.files("distca.recipes").joinpath(path.name)
    if shipped.is_file() and path.parent.name in ("", "recipes"):
        return shipped.read_bytes()
    return None


def read_recipe(path: Path) -> dict[str, Any]:
    """The recipe's sections (``{}`` for an empty file); :class:`RecipeFileError` otherwise."""
    data = _recipe_bytes(path)
    if data is None:
        raise RecipeFileError("no such recipe file (nor a shipped recipe of that name)")
    raw = read_yaml(data)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeFileError("the top level must be a mapping of sections")
    return raw


def paths_as_lists(layer: dict) -> dict:
    """``data.paths=x.jsonl`` means a list of one (likewise ``data.eval_paths``)."""
    data = layer.get("data")
    if isinstance(data, dict):
        for key in ("paths", "eval_paths"):
            if isinstance(data.get(key), str):
                data[key] = [data[key]]
    return layer
