"""FocuSFT trainer mode: the bilevel step on top of :class:`distca.step.Step` (design §6).

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
   With ``focusft.inner_backtrack`` > 0 (an option; the reference takes every step), a step
   that raises the inner loss is undone and retried at half the lr (backtracking line
   search), the remedy for the reference lr 1.0 overshooting on small models;
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

A dedicated attention server runs this same step with its attention-only stage, whose anchor
stands in for the fast weights (:mod:`distca.model.attention_only`): its inner-loop
``autograd.grad`` joins the adapted layers' exchanges like the workers'.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from distca.batch import PackedBatch, loss_token_count
from distca.config import DistcaConfig
from distca.focusft.fast_weights import top_layer_count
from distca.mesh import ProcessMesh
from distca.parallel.planning import StepPlan
from distca.step import Step, plan_stats


class FocusftStep(Step):
    """A :class:`Step` whose ``forward_backward`` is the FocuSFT bilevel step."""

    def __init__(self, cfg: DistcaConfig, mesh: ProcessMesh) -> None:
        if cfg.parallel.tp != 1:
            raise NotImplementedError("focusft.enabled needs parallel.tp=1 (fast LoRA weights "
                                      "are not tensor-parallel yet)")
        f = cfg.focusft
        self.num_top = top_layer_count(cfg.model.num_layers // cfg.parallel.pp, f.layer_fraction)
        self.fast_layers = self.num_top
        super().__init__(cfg, mesh)
        self.fast = self.role.fast_weights(f, self.num_top)

    # ---- model pieces ----------------------------------------------------------------------
    def bottom(self, tokens: torch.Tensor) -> torch.Tensor:
        """Everything below the first fast weight: hidden (T, 1, H) in the model dtype.

        The embedding, the layers without fast weights and the first adapted layer's attention
        half (its residual stream after attention, the input of its MLP half).
        """
        layers = self.stage.layers
        first = len(layers) - self.num_top
        hidden = self.stage.embed(tokens, None)
        for layer in layers[:first]:
            hidden = layer(hidden)
        return layers[first].attention_block(hidden)

    def top(self, hidden: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Sum of this rank's response-token losses (fp32 scalar) from :meth:`bottom`'s output."""
        layers = self.stage.layers
        first = len(layers) - self.num_top
        hidden = layers[first].mlp_block(hidden)
        for layer in layers[first + 1:]:
            hidden = layer(hidden)
        losses = self.stage.losses(hidden, labels)
        return (losses.float() * mask).sum()

    # ---- the bilevel step ------------------------------------------------------------------
    def forward_backward(self, micro_batches: list[PackedBatch]) -> dict[str, float]:
        """Outer loss and base-weight gradients (data-parallel summed) after the inner loops.

        Extra stats: ``inner_loss_{i}`` = response-token mean loss before inner SGD step ``i``,
        over all micro-batches' loss tokens like ``loss`` (the one after the last step), so
        ``inner_loss_0`` is the SFT loss of the same weights; with ``focusft.inner_backtrack``,
        ``inner_rejected`` = trial inner steps rejected in this step (all micro-batches).
        """
        self._begin()
        f = self.cfg.focusft
        total = max(loss_token_count(micro_batches), 1)
        loss_sum = torch.zeros((), dtype=torch.float64)
        inner = torch.zeros(f.inner_steps, dtype=torch.float64)
        plans, rejected = [], 0
        self.fast.active = True
        try:
            for index, batch in enumerate(micro_batches):
                plan = self.exchanges.plan(batch)
                plans.append(plan)
                local, inner_losses, tries = self._micro_batch_step(index, batch, plan, total)
                loss_sum += local
                inner += inner_losses
                rejected += tries
        finally:
            self.fast.active = False
        self._sync_gradients()
        self.mesh.all_reduce_grads(loss_sum)
        stats = {"loss": float(loss_sum) / total, **plan_stats(plans)}
        # inner sums are data-parallel summed already; a plain mean of per-micro-batch means
        # would weight a micro-batch with few loss tokens like one with many
        stats.update({f"inner_loss_{i}": float(v) / total for i, v in enumerate(inner)})
        if f.inner_backtrack:
            stats["inner_rejected"] = float(rejected)
        return stats

    def _micro_batch_step(self, index: int, batch: PackedBatch, plan: StepPlan, total: int
                          ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Reset, inner loop and outer backward of one micro-batch.

        Returns this rank's outer loss sum (float64 scalar), the inner loss sums over the
        whole micro-batch, all ranks ((inner_steps,) float64) and the rejected trial steps.
        """
        # the SFT step's own exchange (ping-pong halves when on): any other split of the
        # attention work changes the float summation order and inner_steps=0 would drift from SFT
        tokens, labels, mask = self.load(batch, plan)
        seed = (self.cfg.trainer.seed * 1_000_003 + self.step) * 1_009 + index
        self.fast.reset(torch.Generator().manual_seed(seed))
        hidden = self.bottom(tokens)
        inner, rejected = self._inner_loop(hidden.detach(), labels, mask,
                                           max(loss_token_count([batch]), 1))
        self.fast.freeze()
        local = self.top(hidden, labels, mask)
        (local / total).backward()
        return local.detach().double().cpu(), inner, rejected

    def _inner_loop(self, hidden: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                    count: int) -> tuple[torch.Tensor, int]:
        """Adapt the fast weights in place.

        Returns the (inner_steps,) float64 loss sums seen (over the micro-batch's ``count``
        loss tokens on every rank) and how many trial steps backtracking rejected. When a step
        finds no lr that does not raise the loss, the loop stops there and the later entries
        repeat the last loss (the fast weights did not move).
        """
        f = self.cfg.focusft
        losses = torch.zeros(f.inner_steps, dtype=torch.float64)
        rejected, local = 0, None
        for i in range(f.inner_steps):
            if local is None:
                local = self.top(hidden, labels, mask)
            grads = torch.autograd.grad(local / count, self.fast.tensors)
            # fast-weight gradients and the loss sum summed over ranks in one message
            flat = torch.cat([g.reshape(-1) for g in grads]
                             + [local.detach().reshape(1).to(grads[0].dtype)])
            self.mesh.all_reduce_grads(flat)
            losses[i] = float(flat[-1])
            offset, summed = 0, []
            for g in grads:
                summed.append(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
            if not f.inner_backtrack:
                self.fast.sgd_step(summed, f.inner_lr, f.inner_grad_clip)
                local = None
                continue
            local, tries = self._backtracking_step(hidden, labels, mask, summed, float(losses[i]),
                                                   keep_graph=i + 1 < f.inner_steps)
            rejected += tries
            if local is None:
                losses[i + 1:] = losses[i]
                break
        return losses, rejected

    def _backtracking_step(self, hidden: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                           grads: list[torch.Tensor], before: float, keep_graph: bool
                           ) -> tuple[torch.Tensor | None, int]:
        """One inner SGD step with backtracking (``focusft.inner_backtrack`` halvings at most).

        Tries lr, lr/2, ...; a trial is kept when the micro-batch's loss sum after it (a
        forward of the top layers, summed over the data-parallel workers like ``before``) is
        not above ``before``, the sum before the step; the workers' decision reaches the
        dedicated servers through the exchange group, so every rank takes the same branch. Returns the kept trial's local loss sum (with its
        graph when ``keep_graph``, the next step's forward) or None when every trial raised the
        loss (the fast weights are then restored), and the number of rejected trials.
        """
        f = self.cfg.focusft
        start = [t.detach().clone() for t in self.fast.tensors]
        lr = f.inner_lr
        for tries in range(f.inner_backtrack + 1):
            self.fast.sgd_step(grads, lr, f.inner_grad_clip)
            with torch.set_grad_enabled(keep_graph):
                local = self.top(hidden, labels, mask)
            after = local.detach().reshape(1).clone()  # summed like ``before``
            self.mesh.all_reduce_grads(after)
            # the workers' decision, also to the dedicated servers (they hold no loss)
            rise = torch.tensor([0.0 if self.mesh.is_server else float(float(after) > before)])
            dist.all_reduce(rise, op=dist.ReduceOp.MAX, group=self.mesh.exchange)
            if not rise:
                return local, tries
            with torch.no_grad():
                for tensor, saved in zip(self.fast.tensors, start):
                    tensor.copy_(saved)
            lr /= 2
        return None, f.inner_backtrack + 1
