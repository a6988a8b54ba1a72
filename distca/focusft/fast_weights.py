"""Transient "fast" LoRA adapters on megatron MLP linears (design §6).

A fast adapter adds ``scale * B @ A @ x`` (``scale = alpha / rank``) to a linear's output
through a forward hook. Its tensors are plain leaf tensors owned by :class:`FastLoRA`, never
registered on the model: they cannot reach ``model.parameters()``, so they stay out of the
optimiser, the data-parallel gradient all-reduce and every checkpoint by construction.
The adapters act only while :attr:`FastLoRA.active` is set (the bilevel step of :mod:`distca.focusft.step`), so
evaluation and generation see the base model alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def top_layer_count(num_layers: int, layer_fraction: float) -> int:
    """How many of the top layers carry fast adapters: ``round(fraction * layers)``, >= 1."""
    return min(num_layers, max(1, round(layer_fraction * num_layers)))


class FastLoRA:
    """Fast LoRA weights on ``targets`` (e.g. ``linear_fc1``) of the given transformer layers.

    For a target linear with input width ``n`` and output width ``m``: ``A`` (rank, n) and
    ``B`` (m, rank), both fp32 on the layer's device; the adapter runs in fp32 and its result
    is cast to the linear's output dtype.
    """

    def __init__(self, layers: list[torch.nn.Module], targets: list[str], rank: int,
                 alpha: float) -> None:
        if not layers:
            raise ValueError("FastLoRA needs at least one layer")
        self.rank = rank
        self.scale = alpha / rank
        self.names: list[str] = []
        self.tensors: list[torch.Tensor] = []  # A0, B0, A1, B1, ... in self.names order
        self._hooks = []
        self.active = False
        for layer in layers:
            for target in targets:
                linear = getattr(layer.mlp, target)
                weight = linear.weight
                out_features, in_features = weight.shape
                a = torch.zeros(rank, in_features, dtype=torch.float32, device=weight.device,
                                requires_grad=True)
                b = torch.zeros(out_features, rank, dtype=torch.float32, device=weight.device,
                                requires_grad=True)
                self.names += [f"layer{layer.layer_number}.{target}.A",
                               f"layer{layer.layer_number}.{target}.B"]
                self.tensors += [a, b]
                self._hooks.append(linear.register_forward_hook(self._hook(a, b)))

    def _hook(self, a: torch.Tensor, b: torch.Tensor):
        def add_adapter(module, args, output):
            if not self.active:
                return output
            out, bias = output
            delta = F.linear(F.linear(args[0].float(), a), b) * self.scale
            return out + delta.to(out.dtype), bias
        return add_adapter

    @torch.no_grad()
    def reset(self, generator: torch.Generator) -> None:
        """A ~ Kaiming-uniform (PEFT's ``a=sqrt(5)``: bound ``1/sqrt(fan_in)``), B = 0; both
        take gradients again (for the inner loop's ``torch.autograd.grad``)."""
        for a, b in zip(self.tensors[0::2], self.tensors[1::2]):
            bound = 1.0 / math.sqrt(a.shape[1])
            draw = torch.rand(a.shape, generator=generator, dtype=torch.float32)
            a.copy_(draw.mul_(2 * bound).sub_(bound))
            b.zero_()
        for t in self.tensors:
            t.requires_grad_(True)

    def freeze(self) -> None:
        """Constants for the outer step: its backward computes no fast-weight gradient (it
        would be wasted work, left behind in ``.grad`` across steps)."""
        for t in self.tensors:
            t.requires_grad_(False)

    @torch.no_grad()
    def sgd_step(self, grads: list[torch.Tensor], lr: float, clip: float) -> None:
        """Plain SGD, each gradient tensor first clipped to L2 norm ``clip`` on its own."""
        for w, g in zip(self.tensors, grads):
            norm = float(g.norm())
            factor = clip / norm if norm > clip else 1.0
            w.sub_(g, alpha=lr * factor)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
