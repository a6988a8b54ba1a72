"""The shape of the code: one-way layers, no import cycles, one class per name (design §1).

Read from the source with ``ast`` (nothing is imported): every ``import`` and ``from … import``
at any depth of a module counts, so a lazy import inside a function cannot hide a dependency.

* ``distca.scheduler`` imports neither torch nor ``distca.parallel``/``distca``;
* ``distca.parallel`` imports nothing of ``distca`` beyond the scheduler (and itself);
* the module import graph has no cycle, and no module defines a module-level ``__getattr__``;
* no class name is defined in two modules; modules stay under ~400 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"distca": ROOT / "distca", "distca.scheduler": ROOT / "scheduler",
           "distca.parallel": ROOT / "parallel"}
MAX_LINES = 420


def _modules() -> dict[str, Path]:
    """Every installed module name -> its file."""
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of everything the module imports (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            # ``from pkg import mod`` depends on pkg.mod; ``from mod import name`` on mod
            subs = {f"{base}.{alias.name}" for alias in node.names}
            names.update(subs if subs <= set(MODULES) else subs | {base})
    return names


def _internal(names: set[str]) -> set[str]:
    """The project modules among imported names (``from pkg import mod`` counts ``pkg.mod``)."""
    return {n for n in names if n in MODULES}


def test_scheduler_imports_numpy_only():
    for name, path in MODULES.items():
        if name.startswith("distca.scheduler"):
            bad = {n for n in _imports(name, path)
                   if n.split(".")[0] == "torch"
                   or (n.startswith("distca") and not n.startswith("distca.scheduler"))}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_parallel_imports_only_the_scheduler_of_distca():
    for name, path in MODULES.items():
        if name.startswith("distca.parallel"):
            bad = {n for n in _imports(name, path) if n.startswith("distca")
                   and not n.startswith(("distca.scheduler", "distca.parallel"))}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_no_import_cycles():
    graph = {name: _internal(_imports(name, path)) - {name} for name, path in MODULES.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_no_module_level_getattr_and_one_class_per_name():
    owners: dict[str, list[str]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
                raise AssertionError(f"{name} defines a module-level __getattr__ (lazy import)")
            if isinstance(node, ast.ClassDef):
                owners.setdefault(node.name, []).append(name)
    doubles = {cls: mods for cls, mods in owners.items() if len(mods) > 1}
    assert not doubles, f"class names defined in several modules: {doubles}"


def test_modules_stay_small():
    long = {name: n for name, path in MODULES.items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
