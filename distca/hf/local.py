"""Our megatron model in this one process, for conversion checks and evaluation.

The step expects torch.distributed and megatron's parallel state; a single process gets a
world of one (gloo over an in-memory store, so nothing listens on a socket) and TP=PP=DP=1.
Each call treats its tokens as one document: causal, or with GLM turns (design §2) given as
``turns = [(length, is_context), ...]``. :meth:`LocalModel.greedy` decodes with a KV cache;
:meth:`LocalModel.attention_stats` adds a sequence's attention statistics to an
:class:`AttentionStats`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist

from distca.attention import AttentionStats, RowSpec
from distca.bootstrap import start_process_group
from distca.config import DistBackend, DistcaConfig, ModelConfig, validate
from distca.hf.layer_runtimes import CachedLayer, DecodeState, layer_runtimes
from distca.model.probe import AttentionProbe, ProbeRows
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

    ``logits(tokens, turns=None)``: tokens (S,) int64 -> (S, vocab) fp32; causal over the S
    tokens, or the GLM mask of ``turns``.
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
    def logits(self, tokens: torch.Tensor | np.ndarray,
               turns: list[tuple[int, bool]] | None = None) -> torch.Tensor:
        ids = torch.as_tensor(tokens, dtype=torch.int64).reshape(-1)
        self._set_batch(ids.numel(), turns)
        return self._forward(ids)

    def _set_batch(self, n: int, turns: list[tuple[int, bool]] | None) -> None:
        """Point the step's runtime at one document of ``n`` tokens (and its turns)."""
        lengths = None if turns is None else np.array([t[0] for t in turns], np.int64)
        context = None if turns is None else np.array([t[1] for t in turns], bool)
        plan = colocated_plan(documents_from_batch(np.array([n]), lengths, context), 1, n)
        device = self.step.device
        layout = build_layout(plan.servers, 0, 1, n, 1, [0], device)
        self.step.runtime.set_batch(torch.arange(n, device=device),
                                    BlockingExchange(layout, None))

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(n,) int64 -> (n, vocab) fp32 logits, through whatever runtimes the layers hold."""
        out = self.model(ids.to(self.step.device).view(1, -1), None, None)
        return out.reshape(ids.numel(), -1).float().cpu()

    @torch.no_grad()
    def greedy(self, prompt: torch.Tensor | np.ndarray, bidirectional_prompt: bool = False
               ) -> Iterator[int]:
        """Greedy tokens after ``prompt`` (S,) int64, one per ``next()``, from a KV cache.

        ``bidirectional_prompt``: the prompt is one GLM context turn (the generated tokens a
        causal response turn after it); otherwise everything is causal.
        """
        state = DecodeState(self.cfg.model.rope_theta)
        layers = [CachedLayer(state, self.cfg.attention.backend.value)
                  for _ in self.model.decoder.layers]
        ids = torch.as_tensor(prompt, dtype=torch.int64).reshape(-1)
        state.bidirectional, at = bidirectional_prompt, 0
        with layer_runtimes(self.model, layers):
            while True:
                state.positions = torch.arange(at, at + ids.numel(), device=self.step.device)
                token = int(self._forward(ids)[-1].argmax())
                at += ids.numel()
                state.bidirectional = False
                yield token
                ids = torch.tensor([token])

    @torch.no_grad()
    def attention_stats(self, stats: AttentionStats, tokens: torch.Tensor | np.ndarray,
                        rows: RowSpec, turns: list[tuple[int, bool]] | None = None
                        ) -> torch.Tensor:
        """Add the attention statistics of one forward over ``tokens`` (S,) (causal, or the
        GLM mask of ``turns``) to ``stats``, averaged over ``rows``; returns that forward's
        logits (S, vocab) fp32."""
        ids = torch.as_tensor(tokens, dtype=torch.int64).reshape(-1)
        self._set_batch(ids.numel(), turns)
        probe = AttentionProbe(stats, device=self.step.device)
        probe.start_micro_batch(ProbeRows.one_document(rows))
        runtime = self.step.runtime
        runtime.probe = probe  # the statistics path of training (distca.model.probe)
        try:
            return self._forward(ids)
        finally:
            runtime.probe = None
