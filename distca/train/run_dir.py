"""The run directory: resolved config, metrics, TensorBoard events, workers, checkpoints."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from distca.config import DistcaConfig, to_yaml
from distca.train.errors import RunFileError


def default_run_dir(recipe: str | Path) -> Path:
    """A new, empty ``runs/<recipe>-<timestamp>/`` relative to the working directory (``-2``,
    ``-3``, ... appended when taken): created here, so two runs started in the same second
    never share one and overwrite each other's checkpoints."""
    base = Path("runs") / f"{Path(recipe).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    base.parent.mkdir(parents=True, exist_ok=True)
    path, n = base, 1
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise RunFileError(path, exc) from None


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def workers(self) -> Path:
        return self.path / "workers.json"

    def write_config(self, cfg: DistcaConfig) -> None:
        _write_atomically(self.path / "config.yaml", to_yaml(cfg))

    def write_workers(self, workers: list[dict]) -> None:
        """``workers``: one ``{rank, role, node, pid}`` per process; rewritten on restart."""
        _write_atomically(self.workers, json.dumps(workers, indent=1) + "\n")
