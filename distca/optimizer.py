"""The update of one rank's parameters: AdamW, stepping fp32 master weights for a bf16 model.

A bf16 weight cannot take an update below its resolution (about 0.4% of its value): at the
learning rates of fine-tuning, most updates would round away and most weights never move. So a
bf16 model's parameters get fp32 master copies; AdamW steps those (its moments are fp32 too),
and the model receives them rounded after every step, as megatron's mixed-precision optimizer
does. An fp32 model is stepped in place. Memory per bf16 parameter: 2 (weight) + 2 (gradient)
+ 4 (master) + 8 (moments) bytes; nothing is sharded across data-parallel ranks.
"""

from __future__ import annotations

import torch

from distca.config import OptimConfig


class Optimizer:
    """AdamW over ``params`` (the model's trainable tensors; weight decay on those with
    ndim >= 2), with fp32 master copies when any of them is not fp32.

    The gradients stay on the model's parameters (``.grad``, reduced and clipped by the
    engine); :meth:`step` takes them from there.
    """

    def __init__(self, params: list[torch.Tensor], o: OptimConfig) -> None:
        self.params = params
        self.master = ([q.detach().float().clone() for q in params]
                       if any(q.dtype != torch.float32 for q in params) else None)
        self.stepped = self.master or params  # what AdamW updates, in the order of params
        self.adamw = torch.optim.AdamW(
            [{"params": [m for m, q in zip(self.stepped, params) if q.ndim >= 2],
              "weight_decay": o.weight_decay},
             {"params": [m for m, q in zip(self.stepped, params) if q.ndim < 2],
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
        for m, q in zip(self.master, self.params):
            m.grad = q.grad.float()
        self.adamw.step()
        with torch.no_grad():
            for m, q in zip(self.master, self.params):
                q.copy_(m)

    @torch.no_grad()
    def master_from_model(self) -> None:
        """Take the model's current values as the master weights (after loading weights)."""
        for m, q in zip(self.master or [], self.params):
            m.copy_(q)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat CPU tensors: ``master.{i}`` (bf16 models) and ``optim.{i}.{key}`` per parameter."""
        state = {f"master.{i}": m.detach().cpu().clone() for i, m in enumerate(self.master or [])}
        for i, m in enumerate(self.stepped):
            for key, value in self.adamw.state.get(m, {}).items():
                state[f"optim.{i}.{key}"] = torch.as_tensor(value).detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`, after the model's weights were loaded. Master weights
        missing from ``state`` (an fp32 or imported checkpoint) are taken from the model."""
        self.master_from_model()
        with torch.no_grad():
            for i, m in enumerate(self.master or []):
                if f"master.{i}" in state:
                    m.copy_(state[f"master.{i}"])
        self.adamw.state.clear()
        for i, m in enumerate(self.stepped):
            entries = {k.split(".", 2)[2]: v for k, v in state.items()
                       if k.startswith(f"optim.{i}.")}
            if entries:  # moments take the stepped tensors' dtype (older bf16 checkpoints)
                self.adamw.state[m] = {k: v.clone() if k == "step" else v.to(m.device, m.dtype)
                                       for k, v in entries.items()}
