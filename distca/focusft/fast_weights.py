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
    """How many of the top layers carry fast adapters: layers ``int(L * (1 - fraction))`` ..
    ``L - 1`` like the reference (11 of 30 at 0.35; ``round`` would give 10), at least one."""
    return max(1, num_layers - int(num_layers * (1.0 - layer_fraction)))


# target -> (megatron linear, which part of its output): gate_proj and up_proj are the first
# and second halves of the fused linear_fc1 (megatron's SwiGLU chunks gate first, then up).
_TARGET_SLOTS = {"gate_proj": ("linear_fc1", 0), "up_proj": ("linear_fc1", 1),
                 "down_proj": ("linear_fc2", 0)}
_SLOTS_PER_LINEAR = {"linear_fc1": 2, "linear_fc2": 1}


class FastLoRA:
    """Fast LoRA weights on ``targets`` (``gate_proj``, ``up_proj``, ``down_proj``, the
    reference's names) of the given transformer layers, one adapter per target.

    For a target with input width ``n`` and output width ``m`` (``m`` = ffn width for
    gate/up, one half of ``linear_fc1``'s output; hidden width for down): ``A`` (rank, n) and
    ``B`` (m, rank), both fp32 on the layer's device; the adapter runs in fp32 and its result
    is cast to the linear's output dtype. Tensor-parallel ranks would split the fused halves,
    so this assumes TP = 1 (the FocuSFT engine checks it).
    """

    def __init__(self, layers: list[torch.nn.Module], targets: list[str], rank: int,
                 alpha: float) -> None:
        if not layers:
            raise ValueError("FastLoRA needs at least one layer")
        unknown = sorted(set(targets) - set(_TARGET_SLOTS))
        if unknown:
            raise ValueError(f"unknown fast-weight targets {unknown} "
                             f"(choose from {', '.join(_TARGET_SLOTS)})")
        self.rank = rank
        self.scale = alpha / rank
        self.names: list[str] = []
        self.tensors: list[torch.Tensor] = []  # A0, B0, A1, B1, ... in self.names order
        self._hooks = []
        self.active = False
        for layer in layers:
            slots: dict[str, list] = {name: [None] * count
                                      for name, count in _SLOTS_PER_LINEAR.items()}
            for target in targets:
                name, part = _TARGET_SLOTS[target]
                weight = getattr(layer.mlp, name).weight
                width = weight.shape[0] // _SLOTS_PER_LINEAR[name]
                a = torch.zeros(rank, weight.shape[1], dtype=torch.float32,
                                device=weight.device, requires_grad=True)
                b = torch.zeros(width, rank, dtype=torch.float32, device=weight.device,
                                requires_grad=True)
                self.names += [f"layer{layer.layer_number}.{target}.A",
                               f"layer{layer.layer_number}.{target}.B"]
                self.tensors += [a, b]
                slots[name][part] = (a, b)
            for name, adapters in slots.items():
                if any(adapters):
                    linear = getattr(layer.mlp, name)
                    self._hooks.append(linear.register_forward_hook(self._hook(adapters)))

    def _hook(self, adapters: list[tuple[torch.Tensor, torch.Tensor] | None]):
        """``adapters``: one (A, B) or None per equal part of the linear's output, in order."""
        def add_adapters(module, args, output):
            if not self.active:
                return output
            out, bias = output
            x = args[0].float()
            width = out.shape[-1] // len(adapters)
            parts = [F.linear(F.linear(x, ab[0]), ab[1]) if ab is not None
                     else x.new_zeros(*x.shape[:-1], width) for ab in adapters]
            delta = (parts[0] if len(parts) == 1 else torch.cat(parts, -1)) * self.scale
            return out + delta.to(out.dtype), bias
        return add_adapters

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
