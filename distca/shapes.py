"""The attention shape the planner counts bytes with, from a run's config (light: no torch,
so ``distca memory`` and ``distca plan`` answer without importing the runtime)."""

from __future__ import annotations

from distca.config import DistcaConfig
from distca.scheduler import ModelShape
from distca.scheduler.sim_model import ModelSpec


def plan_shape(cfg: DistcaConfig) -> ModelShape:
    """Attention shape of one tensor-parallel rank, as the planner counts bytes."""
    bytes_per_elem = 2 if cfg.trainer.precision.value == "bf16" else 4
    return ModelSpec.of(cfg.model, bytes_per_elem).shard_shape(cfg.parallel.tp)
