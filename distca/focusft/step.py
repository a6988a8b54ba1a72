"""FocuSFT trainer mode: the bilevel step on top of :class:`distca.step.Step` (design §6).

Per micro-batch:

1. reset the fast LoRA weights of the top ``layer_fraction`` of layers (A Kaiming-uniform,
   B zero), drawn from a generator seeded by (seed, step, micro-batch) so every rank holds the
   same fast weights (its slice of them with tensor parallelism);
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

With tensor parallelism the fast weights are sharded like the MLP weights they adapt
(:mod:`distca.focusft.fast_weights`). With pipeline parallelism a micro-batch goes through the
stages in order, one step of it at a time: (2) on the stages up to the one holding the first
adapted layer, each inner step's forward and ``autograd.grad`` through the stages from that
one up (activations forward, their gradients back, each stage adapting its own fast weights),
then the outer forward and backward through all of them. The stages below the adapted layers
idle during the inner steps, and micro-batches do not overlap (no 1F1B): the inner loop needs
a micro-batch's whole pipeline round trip per step. Every stage plans every micro-batch
first (the plan broadcast is over all ranks), and attention stays within each stage's
data-parallel group (:func:`distca.mesh.lockstep_pipeline`).

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
from distca.parallel.pipeline import (
    StageLinks,
    recv_backward,
    recv_forward,
    send_backward,
    send_forward,
)
from distca.parallel.planning import StepPlan
from distca.step import Step, plan_stats


class FocusftStep(Step):
    """A :class:`Step` whose ``forward_backward`` is the FocuSFT bilevel step."""

    def __init__(self, cfg: DistcaConfig, mesh: ProcessMesh) -> None:
        f = cfg.focusft
        # the whole model's adapted layers (a dedicated server, pp = 1, marks the same ones)
        self.fast_layers = top_layer_count(cfg.model.num_layers, f.layer_fraction)
        super().__init__(cfg, mesh)
        per_stage = cfg.model.num_layers // mesh.pp
        # this stage's local index of the model's first adapted layer (outside [0, per_stage)
        # when that layer is on another stage)
        first = cfg.model.num_layers - self.fast_layers - mesh.pp_rank * per_stage
        self.num_top = per_stage - min(max(first, 0), per_stage)  # adapted layers here
        self.below = first >= per_stage  # no fast weights: the same output every inner step
        self.above = first < 0  # all layers adapted: a new input every inner step
        self.fast = self.role.fast_weights(f, self.fast_layers)

    # ---- model pieces ----------------------------------------------------------------------
    def bottom(self, tokens: torch.Tensor, hidden_in: torch.Tensor | None) -> torch.Tensor:
        """This stage below its first fast weight: hidden (T, 1, H) in the model dtype.

        The embedding (or ``hidden_in``, the previous stage's output), the layers without fast
        weights and the first adapted layer's attention half (its residual stream after
        attention, the input of its MLP half); the whole stage on a stage :attr:`below`.
        """
        layers = self.stage.layers
        first = len(layers) - self.num_top
        hidden = self.stage.embed(tokens, hidden_in)
        for layer in layers[:first]:
            hidden = layer(hidden)
        return layers[first].attention_block(hidden) if self.num_top else hidden

    def top(self, hidden: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The rest of this stage from :meth:`bottom`'s output (on a stage :attr:`above`, the
        whole stage from its input): the sum of this rank's response-token losses (fp32 scalar)
        on the last stage, else the output hidden (T, 1, H) for the next stage."""
        layers = self.stage.layers
        first = len(layers) - self.num_top
        if not self.above:
            hidden = layers[first].mlp_block(hidden)
            first += 1
        for layer in layers[first:]:
            hidden = layer(hidden)
        if not self.stage.post_process:
            return hidden
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
        # every rank joins every plan broadcast, in micro-batch order, before any stage runs
        plans = [self.exchanges.plan(batch) for batch in micro_batches]
        links = self.links(micro_batches)
        rejected = 0
        self.fast.active = True
        try:
            for index, (batch, plan) in enumerate(zip(micro_batches, plans)):
                local, inner_losses, tries = self._micro_batch_step(index, batch, plan, total,
                                                                    links)
                loss_sum += local
                inner += inner_losses
                rejected += tries
        finally:
            self.fast.active = False
        self._sync_gradients()
        self.mesh.all_reduce_grads(loss_sum)
        sums = torch.cat([loss_sum.reshape(1), inner])
        if self.mesh.pp > 1:  # only the last stage has losses; the others add zero
            dist.all_reduce(sums, group=self.mesh.pp_group)
        stats = {"loss": float(sums[0]) / total, **plan_stats(plans)}
        # inner sums are data-parallel summed already; a plain mean of per-micro-batch means
        # would weight a micro-batch with few loss tokens like one with many
        stats.update({f"inner_loss_{i}": float(v) / total for i, v in enumerate(sums[1:])})
        if f.inner_backtrack:
            stats["inner_rejected"] = float(rejected)
        return stats

    def _micro_batch_step(self, index: int, batch: PackedBatch, plan: StepPlan, total: int,
                          links: StageLinks) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Reset, inner loop and outer forward and backward of one micro-batch on this stage.

        Returns this rank's outer loss sum (float64 scalar; zero but on the last stage), the
        inner loss sums over the whole micro-batch, all ranks ((inner_steps,) float64) and the
        trial steps that backtracking rejected.
        """
        # the SFT step's own exchange (ping-pong halves when on): any other split of the
        # attention work changes the float summation order and inner_steps=0 would drift from SFT
        tokens, labels, mask = self.load(batch, plan)
        seed = (self.cfg.trainer.seed * 1_000_003 + self.step) * 1_009 + index
        self.fast.reset(torch.Generator().manual_seed(seed))
        count = max(loss_token_count([batch]), 1)
        hidden_in = hidden = None
        rejected = 0
        if not self.above:  # this stage's input and bottom part are the same every inner step
            hidden_in = recv_forward(links)
            hidden = self.bottom(tokens, hidden_in)
        if self.below:
            out = hidden
            inner = torch.zeros(self.cfg.focusft.inner_steps, dtype=torch.float64)
        else:
            inner, rejected = self._inner_loop(hidden, labels, mask, count, links)
            self.fast.freeze()
            if self.above:
                hidden_in = hidden = recv_forward(links)
            out = self.top(hidden, labels, mask)
        if self.stage.post_process:
            local = out.detach().double().cpu()
            (out / total).backward()
        else:
            local = torch.zeros((), dtype=torch.float64)
            send_forward(out, links)
            torch.autograd.backward(out, recv_backward(links))
        send_backward(None if hidden_in is None else hidden_in.grad, links)
        return local, inner, rejected

    def _inner_loop(self, hidden: torch.Tensor | None, labels: torch.Tensor, mask: torch.Tensor,
                    count: int, links: StageLinks) -> tuple[torch.Tensor, int]:
        """Adapt this stage's fast weights in place from :meth:`bottom`'s output ``hidden``
        (None on a stage :attr:`above`, which receives a new input every inner step); returns
        the (inner_steps,) float64 loss sums seen (over the micro-batch's ``count`` loss tokens
        on every rank; zero but on the last stage) and how many trial steps backtracking
        rejected (``focusft.inner_backtrack``, one stage only). When a step finds no lr that
        does not raise the loss, the loop stops there and the later entries repeat the last
        loss (the fast weights did not move)."""
        f = self.cfg.focusft
        losses = torch.zeros(f.inner_steps, dtype=torch.float64)
        rejected, out = 0, None
        for i in range(f.inner_steps):
            inp = recv_forward(links) if self.above else hidden.detach()
            if out is None:  # else backtracking's kept trial is this step's forward
                out = self.top(inp, labels, mask)
            wrt = self.fast.tensors + ([inp] if self.above else [])
            if self.stage.post_process:
                grads = torch.autograd.grad(out / count, wrt)
                loss = out.detach()
            else:
                send_forward(out, links)
                grads = torch.autograd.grad(out, wrt, recv_backward(links))
                loss = torch.zeros((), dtype=grads[0].dtype)
            if self.above:
                send_backward(grads[-1], links)
                grads = grads[:-1]
            # fast-weight gradients and the loss sum summed over ranks in one message
            flat = torch.cat([g.reshape(-1) for g in grads] + [loss.reshape(1).to(grads[0].dtype)])
            self.mesh.all_reduce_grads(flat)
            losses[i] = float(flat[-1])
            offset, summed = 0, []
            for g in grads:
                summed.append(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
            if not f.inner_backtrack:
                self.fast.sgd_step(summed, f.inner_lr, f.inner_grad_clip)
                out = None
                continue
            out, tries = self._backtracking_step(inp, labels, mask, summed, float(losses[i]),
                                                 keep_graph=i + 1 < f.inner_steps)
            rejected += tries
            if out is None:
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
        dedicated servers through the exchange group, so every rank takes the same branch.

        Returns the kept trial's local loss sum (with its graph when ``keep_graph``: the next
        step's forward) or None when every trial raised the loss (the fast weights are then
        restored), and the number of rejected trials.
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
            rise = torch.tensor([0.0 if self.mesh.is_server else float(after.item() > before)])
            dist.all_reduce(rise, op=dist.ReduceOp.MAX, group=self.mesh.exchange)
            if not rise:
                return local, tries
            with torch.no_grad():
                for tensor, saved in zip(self.fast.tensors, start):
                    tensor.copy_(saved)
            lr /= 2
        return None, f.inner_backtrack + 1
