"""Config sections for what a run reports and evaluates, and their value checks: synthetic chat
data (``data.synth``), validation (``data.eval_paths``, ``trainer.eval_*``) and loggers
(``logging.*``). Kept apart from :mod:`distca.config`, which merges the tree and calls
:func:`validate_sections` from its ``validate``; this module does not import distca.config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

WANDB_MODES = ("offline", "online")


@dataclass
class SynthDataConfig:
    """``data.kind=synth``: chat tasks generated on the fly (``distca data synth``'s tasks)."""

    task: str = "niah"  # niah | vt | cwe
    length: int = 1500  # target prompt tokens
    count: int = 64  # conversations (one epoch)


@dataclass
class LoggingConfig:
    """Optional loggers beside metrics.jsonl and TensorBoard (which are always written)."""

    wandb: bool = False  # Weights & Biases (pip install wandb)
    wandb_project: str = "distca"
    wandb_mode: str = "offline"  # offline needs no network or account; `wandb sync` later


def validate_sections(cfg, fail: Callable[[str, str], Exception]) -> None:
    """Raise ``fail(key, message)`` for the first bad value of these sections."""
    from distca.evals.tasks import TASKS

    s = cfg.data.synth
    if cfg.data.kind.value == "synth" and cfg.data.paths:
        raise fail("data.paths", "data.kind=synth generates its conversations (data.synth); "
                   "to read chat files set data.kind=chat")
    if s.task not in TASKS:
        raise fail("data.synth.task", f"unknown task {s.task!r} ({', '.join(TASKS)})")
    for key in ("length", "count"):
        if getattr(s, key) < 1:
            raise fail(f"data.synth.{key}", f"must be > 0, got {getattr(s, key)}")
    t = cfg.trainer
    if t.eval_interval < 0:
        raise fail("trainer.eval_interval", f"must be >= 0 (0: no validation), got "
                   f"{t.eval_interval}")
    if t.eval_batches < 1:
        raise fail("trainer.eval_batches", f"must be > 0, got {t.eval_batches}")
    if t.eval_interval and not cfg.data.eval_paths:
        raise fail("trainer.eval_interval", "validation needs data.eval_paths (files like "
                   "data.paths)")
    if cfg.data.eval_paths and not t.eval_interval:
        raise fail("data.eval_paths", "set trainer.eval_interval=N to evaluate every N steps")
    if cfg.data.eval_paths and cfg.data.kind.value == "synthetic":
        raise fail("data.eval_paths", "data.kind=synthetic reads no files; validation runs on "
                   "data.kind=text or chat")
    if cfg.logging.wandb_mode not in WANDB_MODES:
        raise fail("logging.wandb_mode", f"{cfg.logging.wandb_mode!r} is not one of "
                   f"{', '.join(WANDB_MODES)}")
