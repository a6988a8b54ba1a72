"""Transient "fast" LoRA adapters on megatron MLP linears (design §6).

A fast adapter adds ``scale * B @ A @ x`` (``scale = alpha / rank``) to a linear's output
through a forward hook. Its tensors are plain leaf tensors owned by :class:`FastLoRA`, never
registered on the model: they cannot reach ``model.parameters()``, so they stay out of the
optimiser, the data-parallel gradient all-reduce and every checkpoint by construction.
The adapters act only while :attr:`FastLoRA.active` is set (the bilevel step of :mod:`distca.focusft.step`), so
evaluation and generation see the base model alone.

**Tensor parallelism.** An adapter is sharded like the weight it adapts, so that a TP run
computes what one rank computes with the whole tensors:

* ``gate_proj``/``up_proj`` (halves of the column-parallel ``linear_fc1``): ``B``'s rows are
  split over the TP ranks like the weight's, ``A`` is whole on every rank. ``h = A x`` passes
  megatron's copy-to-TP-region (backward: all-reduce), so every rank gets the whole ``dh`` and
  with it the whole gradient of ``A`` and of ``x``.
* ``down_proj`` (the row-parallel ``linear_fc2``): ``A``'s columns are split like the weight's,
  ``B`` is whole; ``h = A x`` is the all-reduce of the ranks' partial products.

With sequence parallelism ``h`` is gathered from / reduce-scattered to the ranks' row shards
instead, so the whole tensors (``A`` of fc1, ``B`` of fc2) see only this rank's rows: their
gradients are partial sums, summed over TP in :meth:`FastLoRA.sgd_step`. Per-tensor clipping
takes the norm of the whole tensor (shards' squares summed over TP), so a TP run clips exactly
like TP = 1, and every rank takes the same SGD step.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel import mappings


def top_layer_count(num_layers: int, layer_fraction: float) -> int:
    """How many of the top layers carry fast adapters: layers ``int(L * (1 - fraction))`` ..
    ``L - 1`` like the reference (11 of 30 at 0.35; ``round`` would give 10), at least one."""
    return max(1, num_layers - int(num_layers * (1.0 - layer_fraction)))


# target -> (megatron linear, which part of its output): gate_proj and up_proj are the first
# and second halves of the fused linear_fc1 (megatron's SwiGLU chunks gate first, then up).
_TARGET_SLOTS = {"gate_proj": ("linear_fc1", 0), "up_proj": ("linear_fc1", 1),
                 "down_proj": ("linear_fc2", 0)}
_SLOTS_PER_LINEAR = {"linear_fc1": 2, "linear_fc2": 1}
# the dimension of (A, B) split over TP ranks (None: whole on every rank), like the weight's
_SPLIT = {"linear_fc1": (None, 0), "linear_fc2": (1, None)}


class FastLoRA:
    """Fast LoRA weights on ``targets`` (``gate_proj``, ``up_proj``, ``down_proj``, the
    reference's names) of the given transformer layers, one adapter per target.

    For a target with input width ``n`` and output width ``m`` of the whole model (``m`` = ffn
    width for gate/up, one half of ``linear_fc1``'s output; hidden width for down): ``A``
    (rank, n) and ``B`` (m, rank), fp32 on the layer's device, this tensor rank holding its
    ``1/tp`` slice where the adapted weight is split (module docstring); the adapter runs in
    fp32 and its result is cast to the linear's output dtype. ``layers_below``: adapted layers
    on earlier pipeline stages, whose draws :meth:`reset` skips. ``layers`` may be empty (a
    pipeline stage below the adapted layers).
    """

    def __init__(self, layers: list[torch.nn.Module], targets: list[str], rank: int,
                 alpha: float, tp_rank: int = 0, tp: int = 1, tp_group=None,
                 layers_below: int = 0) -> None:
        unknown = sorted(set(targets) - set(_TARGET_SLOTS))
        if unknown:
            raise ValueError(f"unknown fast-weight targets {unknown} "
                             f"(choose from {', '.join(_TARGET_SLOTS)})")
        self.rank = rank
        self.scale = alpha / rank
        self.tp_rank, self.tp, self.tp_group = tp_rank, tp, tp_group
        self.names: list[str] = []
        self.tensors: list[torch.Tensor] = []  # A0, B0, A1, B1, ... in self.names order
        self.full_shapes: list[tuple[int, int]] = []  # the whole model's shape of each
        self.split_dims: list[int | None] = []  # dimension split over TP, None if whole
        self.partial: list[bool] = []  # whole tensor whose gradient holds this rank's rows only
        self._hooks = []
        self.active = False
        for layer in layers:
            slots: dict[str, list] = {name: [None] * count
                                      for name, count in _SLOTS_PER_LINEAR.items()}
            for target in targets:
                name, part = _TARGET_SLOTS[target]
                linear = getattr(layer.mlp, name)
                rows, cols = linear.weight.shape  # this rank's shard of the fused weight
                rows //= _SLOTS_PER_LINEAR[name]
                a_split, b_split = _SPLIT[name]
                full_in = cols * (tp if a_split == 1 else 1)
                full_out = rows * (tp if b_split == 0 else 1)
                sp = tp > 1 and getattr(linear, "sequence_parallel", False)
                for split, shape, full in ((a_split, (rank, cols), (rank, full_in)),
                                           (b_split, (rows, rank), (full_out, rank))):
                    self.tensors.append(torch.zeros(shape, dtype=torch.float32,
                                                    device=linear.weight.device,
                                                    requires_grad=True))
                    self.full_shapes.append(full)
                    self.split_dims.append(split if tp > 1 else None)
                    self.partial.append(sp and split is None)
                self.names += [f"layer{layer.layer_number}.{target}.A",
                               f"layer{layer.layer_number}.{target}.B"]
                slots[name][part] = tuple(self.tensors[-2:])
            for name, adapters in slots.items():
                if any(adapters):
                    linear = getattr(layer.mlp, name)
                    self._hooks.append(linear.register_forward_hook(self._hook(
                        adapters, name == "linear_fc1",
                        tp > 1 and getattr(linear, "sequence_parallel", False))))
        # the whole A shapes of the adapted layers on earlier stages (all layers alike)
        self._skipped = self.full_shapes[0:2 * len(targets):2] * layers_below

    def _hook(self, adapters: list[tuple[torch.Tensor, torch.Tensor] | None], column: bool,
              sp: bool):
        """``adapters``: one (A, B) or None per equal part of the linear's output, in order;
        ``column``: the linear is column-parallel (else row-parallel); ``sp``: its input or
        output rows are sharded over TP (sequence parallelism)."""
        def low_rank(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
            """``A x`` (rows, 1, rank) over the rows of the linear's output (module docstring)."""
            h, group = F.linear(x, a), self.tp_group
            if column:
                return (mappings.gather_from_sequence_parallel_region(h, group=group) if sp
                        else mappings.copy_to_tensor_model_parallel_region(h, group))
            return (mappings.reduce_scatter_to_sequence_parallel_region(h, group) if sp
                    else mappings.reduce_from_tensor_model_parallel_region(h, group))

        def add_adapters(module, args, output):
            if not self.active:
                return output
            out, bias = output
            x = args[0].float()
            width = out.shape[-1] // len(adapters)
            parts = [F.linear(low_rank(x, ab[0]), ab[1]) if ab is not None
                     else out.new_zeros(*out.shape[:-1], width, dtype=torch.float32)
                     for ab in adapters]
            delta = (parts[0] if len(parts) == 1 else torch.cat(parts, -1)) * self.scale
            return out + delta.to(out.dtype), bias
        return add_adapters

    @torch.no_grad()
    def reset(self, generator: torch.Generator) -> None:
        """A ~ Kaiming-uniform (PEFT's ``a=sqrt(5)``: bound ``1/sqrt(fan_in)``), B = 0; both
        take gradients again (for the inner loop's ``torch.autograd.grad``). Every rank draws
        every adapter's whole ``A`` in the order of the whole model's adapters and keeps its
        slice, so any TP/PP layout starts from the TP = PP = 1 adapters."""
        for shape in self._skipped:  # the layers on earlier pipeline stages
            torch.rand(shape, generator=generator, dtype=torch.float32)
        for i in range(0, len(self.tensors), 2):
            a, b = self.tensors[i], self.tensors[i + 1]
            shape = self.full_shapes[i]
            bound = 1.0 / math.sqrt(shape[1])
            draw = torch.rand(shape, generator=generator, dtype=torch.float32)
            a.copy_(self._slice(draw, self.split_dims[i]).mul_(2 * bound).sub_(bound))
            b.zero_()
        for t in self.tensors:
            t.requires_grad_(True)

    def _slice(self, full: torch.Tensor, dim: int | None) -> torch.Tensor:
        return full if dim is None else full.chunk(self.tp, dim)[self.tp_rank]

    def freeze(self) -> None:
        """Constants for the outer step: its backward computes no fast-weight gradient (it
        would be wasted work, left behind in ``.grad`` across steps)."""
        for t in self.tensors:
            t.requires_grad_(False)

    @torch.no_grad()
    def sgd_step(self, grads: list[torch.Tensor], lr: float, clip: float) -> None:
        """Plain SGD, each gradient tensor first clipped to L2 norm ``clip`` on its own.

        ``grads``: this rank's gradient of each of :attr:`tensors` (fp32, data-parallel
        summed); the partial ones (sequence parallelism) are summed over TP here, and a split
        tensor's norm is that of the whole tensor (collective over TP when ``tp > 1``)."""
        partial = [g for g, p in zip(grads, self.partial) if p]
        if partial:
            flat = torch.cat([g.reshape(-1) for g in partial])
            dist.all_reduce(flat, group=self.tp_group)
            offset = 0
            for g in partial:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        norms = [float(g.norm()) for g in grads]
        split = [i for i, d in enumerate(self.split_dims) if d is not None]
        if split:  # the whole tensor's norm from its shards
            squares = torch.tensor([norms[i] ** 2 for i in split], dtype=torch.float64)
            dist.all_reduce(squares, group=self.tp_group)
            for i, sq in zip(split, squares.tolist()):
                norms[i] = math.sqrt(sq)
        for w, g, norm in zip(self.tensors, grads, norms):
            factor = clip / norm if norm > clip else 1.0
            w.sub_(g, alpha=lr * factor)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
