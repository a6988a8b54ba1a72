"""The factory of a rank's step: its place in the mesh decides its role, the config its step.

    start_process_group(...)          # distca.bootstrap: the one bootstrap
    step = make_rank(cfg)             # collective on every rank
    stats = step.train_step(micro_batches)

A rank is a worker or a dedicated attention server (:mod:`distca.roles`); its step is the
plain one (:class:`distca.step.Step`) or FocuSFT's bilevel one
(:class:`distca.focusft.step.FocusftStep`). Both roles run the same step.
"""

from __future__ import annotations

from distca.config import DistcaConfig
from distca.focusft.step import FocusftStep
from distca.mesh import ProcessMesh
from distca.step import Step


def make_rank(cfg: DistcaConfig) -> Step:
    """This rank's mesh, role and step (collective on every rank, after the bootstrap)."""
    mesh = ProcessMesh.build(cfg)
    return (FocusftStep if cfg.focusft.enabled else Step)(cfg, mesh)
