"""Per-step metrics: one JSON object per line in ``metrics.jsonl`` and TensorBoard scalars (and
the optional W&B logger, :mod:`distca.train.wandb_sink`)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    """Appends rows; on (re)start from step ``start`` it drops rows past it, so a restarted run
    ends with exactly one row per step and the steps it repeated are the repeats' values."""

    def __init__(self, path: Path, tensorboard_dir: Path, start: int, wandb=None):
        self.path = path
        self.tensorboard_dir = tensorboard_dir
        self.wandb = wandb
        self._open(start)

    def _open(self, start: int) -> None:
        path = self.path
        kept = [row for row in read_metrics(path) if row["step"] <= start]
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
        os.replace(tmp, path)
        self._file = path.open("a")
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(self.tensorboard_dir), purge_step=start + 1)

    def rewind(self, step: int) -> None:
        """Forget the rows after ``step`` (the run went back to that step's checkpoint)."""
        self.close()
        self._open(step)

    def log(self, row: dict) -> None:
        """``row`` needs an int ``step``; floats that are NaN/inf are written as null."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in row.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        for key, value in clean.items():
            if key != "step" and isinstance(value, int | float):
                self._tb.add_scalar(key, value, row["step"])
        if self.wandb is not None:
            self.wandb.log(clean)

    def close(self) -> None:
        self._file.close()
        self._tb.close()
