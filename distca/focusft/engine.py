"""FocuSFT trainer mode: the bilevel step on top of :class:`distca.engine.Engine` (design §6).

Per micro-batch:

1. reset the fast LoRA weights of the top ``layer_fraction`` of layers (A Kaiming-uniform,
   B zero), drawn from a generator seeded by (seed, step, micro-batch) so every rank holds the
   same fast weights;
2. run everything below the first fast weight ONCE, with autograd on: the embedding, the
   layers without fast weights, and the attention half of the first adapted layer (its fast
   weights sit on the MLP, so its attention output is the same in every inner step);
3. inner loop: ``inner_steps`` plain SGD steps on the fast weights only, each a forward of the
   rest of the model from the *detached* output of (2) and ``torch.autograd.grad`` of the
   micro-batch's response-token mean loss w.r.t. the fast weights (base ``.grad`` untouched);
4. outer step: the rest of the model again from the *attached* output of (2), with the adapted
   fast weights active; its backward reaches every base weight, bottom layers included.

(2) then (4) run exactly the ops of the SFT forward in the same order (megatron's layer forward
is its attention half then its MLP half), so with ``inner_steps=0`` a step is bitwise an SFT step.

Both loops attend through the step's CA-task plan (the GLM multi-turn mask of the chat data),
so inner-loop attention is balanced across attention servers like the outer loop's.

The inner objective is the response-token mean over the whole micro-batch (all data-parallel
ranks): fast-weight gradients are summed over the data-parallel group in their own small
all-reduce, which keeps every rank's fast weights equal and makes an N-rank step identical to
one process stepping on the whole micro-batch. Fast weights never join the base-gradient
all-reduce, the optimiser or ``state_dict()``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from distca.batch import PackedBatch
from distca.config import DistcaConfig
from distca.engine import IGNORE, Engine, _all_reduce_scalar, _loss_tokens, rank_rows
from distca.focusft.fast_weights import FastLoRA, top_layer_count
from distca.model.staggered import language_model_losses
from distca.parallel.planning import StepPlan


class FocusftEngine(Engine):
    """An :class:`Engine` whose ``forward_backward`` is the FocuSFT bilevel step."""

    def __init__(self, cfg: DistcaConfig) -> None:
        super().__init__(cfg)
        if cfg.parallel.tp != 1:
            raise NotImplementedError("focusft.enabled needs parallel.tp=1 (fast LoRA weights "
                                      "are not tensor-parallel yet)")
        f = cfg.focusft
        layers = list(self.model.decoder.layers)
        self.num_top = top_layer_count(len(layers), f.layer_fraction)
        self.fast = FastLoRA(layers[len(layers) - self.num_top:], list(f.targets), f.rank, f.alpha)

    # ---- model pieces ----------------------------------------------------------------------
    def _load(self, batch: PackedBatch, plan: StepPlan
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Point the attention runtime at ``batch``; this rank's tokens, labels, loss mask (1, T)."""
        rows = batch.rank_slice(self.dp_rank)
        tokens = rank_rows(batch.tokens, rows, self.device)
        labels = rank_rows(batch.labels, rows, self.device)
        positions = torch.as_tensor(batch.position_ids()[rows], device=self.device)
        # the SFT step's own layout (ping-pong nano-batches when on): any other split of the
        # attention work changes the float summation order and inner_steps=0 would drift from SFT
        self.runtime.set_batch(positions, self._layout(batch, plan))
        mask = labels != IGNORE
        return tokens, torch.where(mask, labels, 0), mask

    def bottom(self, tokens: torch.Tensor) -> torch.Tensor:
        """Everything below the first fast weight: hidden (T, 1, H) in the model dtype.

        The embedding, the layers without fast weights and the first adapted layer's attention
        half (its residual stream after attention, the input of its MLP half).
        """
        layers = self.model.decoder.layers
        first = len(layers) - self.num_top
        hidden = self.model.embedding(input_ids=tokens, position_ids=None)
        for layer in layers[:first]:
            hidden, _ = layer(hidden_states=hidden, attention_mask=None)
        hidden, _ = layers[first]._forward_attention(hidden_states=hidden, attention_mask=None)
        return hidden

    def top(self, hidden: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Sum of this rank's response-token losses (fp32 scalar) from :meth:`bottom`'s output."""
        decoder = self.model.decoder
        first = len(decoder.layers) - self.num_top
        hidden = decoder.layers[first]._forward_mlp(hidden)
        for layer in decoder.layers[first + 1:]:
            hidden, _ = layer(hidden_states=hidden, attention_mask=None)
        losses = language_model_losses(self.model, hidden, labels)
        return (losses.float() * mask).sum()

    # ---- the bilevel step ------------------------------------------------------------------
    def forward_backward(self, micro_batches: list[PackedBatch]) -> dict[str, float]:
        """Outer loss and base-weight gradients (data-parallel summed) after the inner loops.

        Extra stats: ``inner_loss_{i}`` = response-token mean loss before inner SGD step ``i``,
        over all micro-batches' loss tokens like ``loss`` (the one after the last step), so
        ``inner_loss_0`` is the SFT loss of the same weights.
        """
        self.model.train()
        self.optimizer.zero_grad()
        f = self.cfg.focusft
        total = max(_loss_tokens(micro_batches), 1)
        loss_sum = torch.zeros((), dtype=torch.float64)
        inner = torch.zeros(f.inner_steps, dtype=torch.float64)
        before, after = [], []
        self.fast.active = True
        try:
            for index, batch in enumerate(micro_batches):
                plan = self._plan(batch)
                before.append(plan.imbalance_before)
                after.append(plan.imbalance)
                local, inner_losses = self._micro_batch_step(index, batch, plan, total)
                loss_sum += local
                inner += inner_losses
        finally:
            self.fast.active = False
        self._sync_gradients()
        stats = {"loss": _all_reduce_scalar(loss_sum, self.dp_group) / total,
                 "imbalance_before": sum(before) / len(before),
                 "imbalance": sum(after) / len(after)}
        # inner sums are data-parallel summed already; a plain mean of per-micro-batch means
        # would weight a micro-batch with few loss tokens like one with many
        stats.update({f"inner_loss_{i}": float(v) / total for i, v in enumerate(inner)})
        return stats

    def _micro_batch_step(self, index: int, batch: PackedBatch, plan: StepPlan, total: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reset, inner loop and outer backward of one micro-batch.

        Returns this rank's outer loss sum (float64 scalar) and the inner loss sums over the
        whole micro-batch, all ranks ((inner_steps,) float64).
        """
        tokens, labels, mask = self._load(batch, plan)
        seed = (self.cfg.trainer.seed * 1_000_003 + self.step) * 1_009 + index
        self.fast.reset(torch.Generator().manual_seed(seed))
        hidden = self.bottom(tokens)
        inner = self._inner_loop(hidden.detach(), labels, mask, max(_loss_tokens([batch]), 1))
        self.fast.freeze()
        local = self.top(hidden, labels, mask)
        (local / total).backward()
        return local.detach().double().cpu(), inner

    def _inner_loop(self, hidden: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                    count: int) -> torch.Tensor:
        """Adapt the fast weights in place; returns the (inner_steps,) float64 loss sums seen
        (over the micro-batch's ``count`` loss tokens on every rank)."""
        f = self.cfg.focusft
        losses = torch.zeros(f.inner_steps, dtype=torch.float64)
        telemetry, self.runtime.telemetry = self.runtime.telemetry, None  # outer forward only
        try:
            for i in range(f.inner_steps):
                local = self.top(hidden, labels, mask)
                grads = torch.autograd.grad(local / count, self.fast.tensors)
                # fast-weight gradients and the loss sum summed over ranks in one message
                flat = torch.cat([g.reshape(-1) for g in grads]
                                 + [local.detach().reshape(1).to(grads[0].dtype)])
                if self.cfg.parallel.dp > 1:
                    dist.all_reduce(flat, group=self.dp_group)
                losses[i] = float(flat[-1])
                offset, summed = 0, []
                for g in grads:
                    summed.append(flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()
                self.fast.sgd_step(summed, f.inner_lr, f.inner_grad_clip)
        finally:
            self.runtime.telemetry = telemetry
        return losses
