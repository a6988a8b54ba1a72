"""GPU backend on PyTorch flex_attention (used where flash-attn is absent).

The whole task list is one flex call: a block mask built from per-row task slots (row ``i``'s
``m``-th task lets it see keys ``[start[i, m], end[i, m])``, the causal limit folded into
``end``), so flex returns the merged ``(O, L)`` directly. flex has no standalone backward, so
``backward`` recomputes the forward under autograd and feeds it gradients chosen so that
``dS = P (dP - delta)`` with the caller's ``delta`` (the ring-attention identity with the
merged output, design §2). Primitives as in :mod:`distca.attention.torch_backend`.
"""

from __future__ import annotations

import functools

import torch

from .gpu_probe import missing_reason
from .merge import NEG_INF
from .tasks import TaskList

DEVICES = ("cuda",)


def is_available() -> bool:
    return unavailable_reason() is None


def unavailable_reason() -> str | None:
    return missing_reason("torch.nn.attention.flex_attention", "this torch has no torch.nn.attention.flex_attention")


@functools.cache
def _flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _slot_tables(tasks: TaskList) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_q, M) int32 ``start`` and ``end`` of the keys each row sees in its m-th task."""
    count = torch.zeros(tasks.num_q, dtype=torch.int64)
    entries = []
    for a, b, c, d, causal in tasks.rows:
        if b <= a or d <= c:
            continue
        rows = torch.arange(a, b)
        slot = count[a:b].clone()
        count[a:b] += 1
        end = torch.clamp(d - b + 1 + rows, max=d) if causal else torch.full_like(rows, d)
        entries.append((rows, slot, c, end))
    width = max(int(count.max()) if tasks.num_q else 0, 1)
    start = torch.zeros(tasks.num_q, width, dtype=torch.int32)
    end = torch.zeros(tasks.num_q, width, dtype=torch.int32)
    for rows, slot, c, e in entries:
        start[rows, slot] = c
        end[rows, slot] = e.to(torch.int32)
    return start, end


def _block_mask(tasks: TaskList, device: torch.device):
    key = f"flex_block_mask:{device}"
    if key not in tasks._on_device:
        from torch.nn.attention.flex_attention import create_block_mask

        start, end = (t.to(device) for t in _slot_tables(tasks))

        def visible(b, h, q_idx, kv_idx):
            ok = (kv_idx >= start[q_idx, 0]) & (kv_idx < end[q_idx, 0])
            for m in range(1, start.shape[1]):
                ok = ok | ((kv_idx >= start[q_idx, m]) & (kv_idx < end[q_idx, m]))
            return ok

        tasks._on_device[key] = create_block_mask(visible, None, None, tasks.num_q,
                                                  tasks.num_kv, device=device)
    return tasks._on_device[key]


def _run(q, k, v, tasks, scale):
    """flex over (N, H, D) tensors -> out (N, H, D), lse (N, H) float32."""
    out, lse = _flex()(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                       v.transpose(0, 1).unsqueeze(0), block_mask=_block_mask(tasks, q.device),
                       scale=scale, enable_gqa=q.shape[1] != k.shape[1], return_lse=True)
    return out.squeeze(0).transpose(0, 1), lse.squeeze(0).transpose(0, 1).float()


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tasks: TaskList,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _run(q, k, v, tasks, scale)
    return out.contiguous(), lse.contiguous()


def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             out: torch.Tensor, lse: torch.Tensor, tasks: TaskList, scale: float,
             dlse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    with torch.enable_grad():
        own_out, own_lse = _run(*leaves, tasks, scale)
    # autograd gives dS = P (dP - rowsum(dout * own_out) + g_lse); choose g_lse so that the
    # bracket is dP - delta with delta = rowsum(dout * out) - dlse.
    delta = (dout.float() * out.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse
    g_lse = (dout.float() * own_out.detach().float()).sum(-1) - delta
    g_lse = torch.where(lse == NEG_INF, 0.0, g_lse)
    return torch.autograd.grad((own_out, own_lse), leaves, (dout, g_lse))
