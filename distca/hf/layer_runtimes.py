"""Per-layer stand-ins for the step's :class:`AttentionRuntime`, for one-process inference.

Every core-attention submodule calls only ``runtime.rope(head_dim)`` and
``runtime.attend(q, k, v, scale, sinks)``, so a one-process model
can hand each layer its own object for one forward (:func:`layer_runtimes`):

- :class:`CachedLayer`: a KV cache. Each forward's tokens follow the cached ones; they attend
  to the whole cache plus themselves, bidirectionally (a GLM context turn) or causally.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from distca.attention import attention_forward
from distca.model.rope import rope_tables


@contextmanager
def layer_runtimes(model, runtimes: list) -> Iterator[None]:
    """Give layer ``i`` of a megatron GPTModel ``runtimes[i]`` for the duration."""
    cores = [layer.self_attention.core_attention for layer in model.decoder.layers]
    if len(cores) != len(runtimes):
        raise ValueError(f"{len(runtimes)} runtimes for {len(cores)} layers")
    saved = [core.runtime for core in cores]
    try:
        for core, runtime in zip(cores, runtimes):
            core.runtime = runtime
        yield
    finally:
        for core, runtime in zip(cores, saved):
            core.runtime = runtime


class DecodeState:
    """What the layers of one cached sequence share: the positions of this forward's tokens and
    whether they attend to each other bidirectionally."""

    def __init__(self, rope_theta: float) -> None:
        self.rope_theta = rope_theta
        self.positions = torch.zeros(0, dtype=torch.int64)
        self.bidirectional = False


class CachedLayer:
    """One layer's K/V cache (after RoPE); attention with :mod:`distca.attention` kernels."""

    def __init__(self, state: DecodeState, backend: str) -> None:
        self.state, self.backend = state, backend
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def rope(self, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_tables(self.state.positions, head_dim, self.state.rope_theta)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
               sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q (n, hq, d), k/v (n, hkv, d) of the new tokens -> (out (n, hq, d), lse (n, hq));
        ``sinks`` are the caller's to apply (as :meth:`AttentionRuntime.attend`)."""
        self.k = k if self.k is None else torch.cat([self.k, k])
        self.v = v if self.v is None else torch.cat([self.v, v])
        n, total = q.shape[0], self.k.shape[0]
        # causal is bottom-right aligned: new row i sees the cache and new tokens 0..i
        return attention_forward(q, self.k, self.v, [(0, n)], [(0, total)],
                                 [not self.state.bidirectional], softmax_scale, self.backend)
