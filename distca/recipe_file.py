"""Reading one recipe YAML into a mapping of config sections, before it is merged and checked
(:mod:`distca.config`).

A recipe is a path; one that does not exist there is looked up by name among the recipes
shipped inside the package (``distca/recipes``), so an installed distca runs
``distca train tiny.yaml`` (or ``recipes/tiny.yaml``) from any directory.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


def _recipe_text(path: Path) -> str | None:
    if path.is_file():
        return path.read_text()
    shipped = resources.files("distca.recipes").joinpath(path.name)
    if shipped.is_file() and path.parent.name in ("", "recipes"):
        return shipped.read_text()
    return None


def read_recipe(path: Path, fail: Callable[[str, str], Exception]) -> dict[str, Any]:
    """The recipe's sections; ``fail(key, message)`` is raised for a missing or bad file."""
    text = _recipe_text(path)
    if text is None:
        raise fail("<recipe>", "no such recipe file (nor a shipped recipe of that name)")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise fail("<recipe>", f"not valid YAML: {exc}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise fail("<recipe>", "the top level must be a mapping of sections")
    return raw


def paths_as_lists(layer: dict) -> dict:
    """``data.paths=x.jsonl`` means a list of one (likewise ``data.eval_paths``)."""
    data = layer.get("data")
    if isinstance(data, dict):
        for key in ("paths", "eval_paths"):
            if isinstance(data.get(key), str):
                data[key] = [data[key]]
    return layer
