"""Our megatron model in this one process, for conversion checks and evaluation.

The step expects torch.distributed and megatron's parallel state; a single process gets a
world of one (gloo over an in-memory store, so nothing listens on a socket) and TP=PP=DP=1.
Each forward call treats its tokens as one document with causal attention.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from distca.config import DistBackend, DistcaConfig, ModelConfig, validate
from distca.mesh import start_process_group
from distca.parallel.exchange import BlockingExchange
from distca.parallel.layout import build_layout
from distca.parallel.planning import colocated_plan
from distca.rank import make_rank
from distca.scheduler import documents_from_batch


def ensure_single_process_group() -> None:
    """Start a one-rank gloo group unless torch.distributed is already initialised."""
    if not dist.is_initialized():
        start_process_group(DistBackend.gloo, 0, 1, None, interface="lo")


def single_rank_config(model: ModelConfig, attention_backend: str = "auto") -> DistcaConfig:
    """A validated config with ``model`` on one rank, colocated attention and fp32 weights."""
    cfg = DistcaConfig(model=model)
    cfg.cad.enabled = False
    cfg.attention.backend = type(cfg.attention.backend)(attention_backend)
    validate(cfg, "<single-rank model>")
    return cfg


class LocalModel:
    """A one-rank :class:`distca.step.Step` model with a logits call.

    ``logits(tokens)``: tokens (S,) int64 -> (S, vocab) fp32, causal over the S tokens.
    """

    def __init__(self, cfg: DistcaConfig) -> None:
        ensure_single_process_group()
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized() and (
                parallel_state.get_tensor_model_parallel_world_size() != 1
                or parallel_state.get_pipeline_model_parallel_world_size() != 1):
            raise RuntimeError("LocalModel needs TP=PP=1")
        self.cfg = cfg
        self.step = make_rank(cfg)
        self.model = self.step.role.model
        self.model.eval()

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load megatron parameter names (no ``model.`` prefix); every parameter must be given."""
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise KeyError(f"state does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")

    def model_state(self) -> dict[str, torch.Tensor]:
        """Megatron parameter names -> CPU tensors (no ``_extra_state`` entries)."""
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()
                if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor | np.ndarray) -> torch.Tensor:
        ids = torch.as_tensor(tokens, dtype=torch.int64).reshape(-1)
        n = ids.numel()
        plan = colocated_plan(documents_from_batch(np.array([n])), 1, n)
        device = self.step.device
        layout = build_layout(plan.servers, 0, 1, n, 1, [0], device)
        self.step.runtime.set_batch(torch.arange(n, device=device),
                                      BlockingExchange(layout, None))
        out = self.model(ids.to(device).view(1, -1), None, None)
        return out.reshape(n, -1).float().cpu()

