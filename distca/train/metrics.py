"""Per-step metrics: one JSON object per line in ``metrics.jsonl``, TensorBoard scalars and the
optional W&B logger (:mod:`distca.train.wandb_sink`).

The files survive a full disk: a failed write raises :class:`RunFileError` (one line naming the
file and the free space) instead of a traceback, and the line a failed write may leave torn at
the end of ``metrics.jsonl`` is dropped, with a warning, when the run resumes.
"""

from __future__ import annotations

import json
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from distca.train.errors import RunFileError


def read_metrics(path: Path) -> list[dict]:
    """Every row; a torn last line (a write cut short) is dropped with a warning, a bad line
    before it names the file and line."""
    if not path.is_file():
        return []
    lines = [(n, line) for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
             if line.strip()]
    rows = []
    for n, line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            if n != lines[-1][0]:
                raise ValueError(f"{path}:{n}: not a JSON metrics row") from None
            print(f"distca: warning: {path}:{n}: dropping a torn last line (a write was cut "
                  f"short)", file=sys.stderr)
    return rows


@contextmanager
def _writing(path: Path):
    try:
        yield
    except OSError as exc:
        raise RunFileError(path, exc) from None


class MetricsLog:
    """Appends rows; on (re)start from step ``start`` it drops rows past it, so a restarted run
    ends with exactly one row per step and the steps it repeated are the repeats' values."""

    def __init__(self, path: Path, tensorboard_dir: Path, start: int, wandb=None):
        self.path = path
        self.tensorboard_dir = tensorboard_dir
        self.wandb = wandb
        self._file = self._tb = None
        self._open(start)

    def _open(self, start: int) -> None:
        path = self.path
        kept = [row for row in read_metrics(path) if row["step"] <= start]
        tmp = path.with_name(path.name + ".partial")
        with _writing(tmp):
            tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
            os.replace(tmp, path)
            self._file = path.open("a")
        from torch.utils.tensorboard import SummaryWriter

        with _writing(self.tensorboard_dir):
            self._tb = SummaryWriter(str(self.tensorboard_dir), purge_step=start + 1)

    def rewind(self, step: int) -> None:
        """Forget the rows after ``step`` (the run went back to that step's checkpoint)."""
        self.close()
        self._open(step)

    def log(self, row: dict) -> None:
        """``row`` needs an int ``step``; floats that are NaN/inf are written as null."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in row.items()}
        with _writing(self.path):
            self._file.write(json.dumps(clean) + "\n")
            self._file.flush()
        with _writing(self.tensorboard_dir):  # its writer thread re-raises its errors here
            for key, value in clean.items():
                if key != "step" and isinstance(value, int | float):
                    self._tb.add_scalar(key, value, row["step"])
        if self.wandb is not None:
            self.wandb.log(clean)

    def close(self) -> None:
        """Close both files; a write error still pending is reported once, here."""
        file, tb, self._file, self._tb = self._file, self._tb, None, None
        try:
            with _writing(self.path):
                if file is not None:
                    file.close()
        finally:
            with _writing(self.tensorboard_dir):
                if tb is not None:
                    tb.close()
