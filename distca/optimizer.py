"""The update of one rank's parameters: AdamW on fp32 master weights, sharded over data parallelism.

A bf16 weight cannot take an update below its resolution (about 0.4% of its value): at the
learning rates of fine-tuning most updates would round away and most weights never move. So
AdamW steps fp32 master copies (its moments are fp32 too) and the model receives them rounded
after every step, as megatron's mixed-precision optimizer does.

With data parallelism every rank holds the same weights and, after the gradient all-reduce, the
same gradients, so each rank keeps the master weights and moments of one contiguous 1/dp slice
of the flattened parameters only (ZeRO stage 1), steps that slice and all-gathers the result.
Memory per parameter: weight and gradient in the model's dtype, plus 12 bytes / dp. AdamW is
elementwise, so the slices step exactly as the whole would. An fp32 model with dp = 1 is
stepped in place.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from distca.config import OptimConfig

Piece = tuple[int, int, int]  # (parameter index, first, end) in that parameter's flat elements
# Elements of one fp32 collective over flattened parameters (128 MiB): gradient all-reduce and
# weight all-gather run in buckets of this size, so their buffers stay small beside the model.
BUCKET = 1 << 25


def pieces_of(sizes: list[int], lo: int, hi: int) -> list[Piece]:
    """The parameters' pieces covering flat elements ``[lo, hi)`` of their concatenation."""
    out, offset = [], 0
    for i, n in enumerate(sizes):
        a, b = max(lo, offset), min(hi, offset + n)
        if a < b:
            out.append((i, a - offset, b - offset))
        offset += n
    return out


def buckets(sizes: list[int], size: int = BUCKET) -> list[list[Piece]]:
    """The concatenation of ``sizes`` elements cut into consecutive buckets of ``size``."""
    total = sum(sizes)
    return [pieces_of(sizes, lo, min(lo + size, total)) for lo in range(0, total, size)]


def _group_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


class Optimizer:
    """AdamW over ``params`` (the model's trainable tensors, the same list in the same order on
    every rank of ``group``; weight decay on those with ndim >= 2).

    Gradients live on the model's parameters (``.grad``, reduced over ``group`` and clipped by
    the engine); :meth:`step` takes them from there and writes the new weights back.
    """

    def __init__(self, params: list[torch.Tensor], o: OptimConfig,
                 group: dist.ProcessGroup | None = None) -> None:
        self.params, self.group = params, group
        self.world = _group_size(group)
        rank = dist.get_rank(group) if self.world > 1 else 0
        self.total = sum(q.numel() for q in params)
        self.slice_len = -(-self.total // self.world)
        self.sizes = [q.numel() for q in params]
        self.pieces = pieces_of(self.sizes, rank * self.slice_len,
                                min((rank + 1) * self.slice_len, self.total))
        in_place = self.world == 1 and all(q.dtype == torch.float32 for q in params)
        self.master = None if in_place else [
            params[i].detach().reshape(-1)[a:b].float().clone() for i, a, b in self.pieces]
        self.stepped = ([params[i] for i, _, _ in self.pieces] if self.master is None
                        else self.master)
        decays = [params[i].ndim >= 2 for i, _, _ in self.pieces]
        self.adamw = torch.optim.AdamW(
            [{"params": [m for m, d in zip(self.stepped, decays) if d],
              "weight_decay": o.weight_decay},
             {"params": [m for m, d in zip(self.stepped, decays) if not d],
              "weight_decay": 0.0}],
            lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)

    def zero_grad(self) -> None:
        """Zero the model's gradients in place (their buffers are reused every step)."""
        for q in self.params:
            if q.grad is not None:
                q.grad.zero_()

    def step(self, lr: float) -> None:
        for group in self.adamw.param_groups:
            group["lr"] = lr
        if self.master is None:
            self.adamw.step()
            return
        for m, (i, a, b) in zip(self.master, self.pieces):
            m.grad = self.params[i].grad.reshape(-1)[a:b].float()
        self.adamw.step()
        self.write_back()

    @torch.no_grad()
    def write_back(self) -> None:
        """Every rank's stepped slice into every rank's model weights (all-gathered in
        buckets of :data:`BUCKET` elements a rank)."""
        if self.world == 1:
            for m, (i, a, b) in zip(self.master, self.pieces):
                self.params[i].view(-1)[a:b].copy_(m)
            return
        mine = (torch.cat(self.master) if self.master
                else torch.zeros(0, device=self.params[0].device))
        mine = torch.nn.functional.pad(mine, (0, self.slice_len - mine.numel()))
        chunk = max(1, BUCKET // self.world)
        for c in range(0, self.slice_len, chunk):
            part = mine[c:c + chunk]
            slices = [torch.empty_like(part) for _ in range(self.world)]
            dist.all_gather(slices, part, group=self.group)
            for r, got in enumerate(slices):
                lo = r * self.slice_len + c
                offset = 0
                for i, a, b in pieces_of(self.sizes, lo, min(lo + got.numel(), self.total)):
                    self.params[i].view(-1)[a:b].copy_(got[offset:offset + b - a])
                    offset += b - a

    @torch.no_grad()
    def master_from_model(self, values: list[torch.Tensor] | None = None) -> None:
        """Take the model's current values as the master weights (after loading weights), or
        ``values``: one tensor per parameter, same shapes, say the fp32 weights a bf16 model
        was rounded from."""
        values = self.params if values is None else values
        for m, (i, a, b) in zip(self.master or [], self.pieces):
            m.copy_(values[i].reshape(-1)[a:b])
