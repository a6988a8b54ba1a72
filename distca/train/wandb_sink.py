"""The optional Weights & Biases logger (``logging.wandb=true``): the rows of metrics.jsonl,
also sent to a W&B run kept inside the run directory.

Off by default; ``logging.wandb_mode=offline`` (the default) needs no account or network and
writes ``RUN_DIR/wandb/`` for a later ``wandb sync``. Enabling it without the ``wandb`` package
installed is a usage error raised before anything starts.
"""

from __future__ import annotations

from pathlib import Path

from distca.config import DistcaConfig, to_yaml


def require_wandb(cfg: DistcaConfig, recipe: str) -> None:
    """ValueError naming the key when ``logging.wandb`` is on and wandb is not installed."""
    if not cfg.logging.wandb:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ValueError(f"{recipe}: logging.wandb: true needs the wandb package "
                         f"(pip install wandb), which is not installed") from None


class WandbSink:
    """One W&B run for the whole ``distca train`` invocation (restarts included)."""

    def __init__(self, cfg: DistcaConfig, run_dir: Path):
        import wandb
        import yaml

        self._run = wandb.init(project=cfg.logging.wandb_project, mode=cfg.logging.wandb_mode,
                               dir=str(run_dir), name=run_dir.name,
                               config=yaml.safe_load(to_yaml(cfg)))
        self._last = 0

    def log(self, row: dict) -> None:
        """Numeric values of ``row`` at ``row["step"]``; W&B steps only go forward, so steps
        repeated after a restart or rollback are in metrics.jsonl only."""
        step = row["step"]
        if step <= self._last:
            return
        self._last = step
        self._run.log({k: v for k, v in row.items()
                       if k != "step" and isinstance(v, int | float)}, step=step)

    def close(self) -> None:
        self._run.finish()
