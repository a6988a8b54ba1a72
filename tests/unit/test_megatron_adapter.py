"""megatron-core internals are used in one module, written for one version range."""

from __future__ import annotations

import ast
from importlib.metadata import version
from pathlib import Path

from packaging.version import Version

from distca.model.megatron_adapter import MEGATRON_CORE_RANGE

ROOT = Path(__file__).resolve().parents[2]


def test_installed_megatron_core_is_the_range_the_adapter_was_written_for():
    first, end = (Version(v) for v in MEGATRON_CORE_RANGE)
    installed = Version(version("megatron-core"))
    assert first <= installed < end, (
        f"megatron-core {installed} is outside {MEGATRON_CORE_RANGE}: re-read "
        "distca/model/megatron_adapter.py (its private calls and CPU shims) before widening it")


def test_megatron_private_names_are_used_only_by_the_adapter():
    """Attribute names with a leading underscore on megatron objects appear only in the
    adapter: searched as every ``x._name`` attribute access outside ``self``/``cls``."""
    private = {"_forward_attention", "_forward_mlp", "_apply_output_gate",
               "_CUDA_RNG_STATE_TRACKER", "_CUDA_RNG_STATE_TRACKER_INITIALIZED"}
    for folder in ("distca", "parallel"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "megatron_adapter.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr in private:
                    raise AssertionError(f"{path.relative_to(ROOT)} uses megatron's {node.attr}")
