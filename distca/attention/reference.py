"""Dense, obviously-correct references: task masks, a float64 oracle and example task lists.

These build the O(S²) mask on purpose; they exist for tests and benchmarks. Production task
lists come from :mod:`distca.scheduler`.
"""

from __future__ import annotations

import math

import torch

from .tasks import TaskList, make_task_list


def task_mask(tasks: TaskList) -> torch.Tensor:
    """(num_q, num_kv) bool: True where a query may attend to a key under some task.

    Causal tasks are aligned bottom-right: task row ``i`` sees its first ``|kv| - |q| + i + 1``
    keys.
    """
    mask = torch.zeros(tasks.num_q, tasks.num_kv, dtype=torch.bool)
    for a, b, c, d, causal in tasks.rows:
        if causal:
            rows = torch.arange(b - a).unsqueeze(1)
            cols = torch.arange(d - c).unsqueeze(0)
            mask[a:b, c:d] |= cols <= rows + (d - c) - (b - a)
        else:
            mask[a:b, c:d] = True
    return mask


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                    sinks: torch.Tensor | None = None, softmax_scale: float | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with a materialised (Nq, Nk) bool mask, differentiable, in q's dtype.

    ``q`` (Nq, Hq, D), ``k``/``v`` (Nk, Hkv, D), ``sinks`` (Hq,). Returns ``out`` (Nq, Hq, D)
    and ``lse`` (Nq, Hq), the sink included. Rows that see no key get 0 and -inf. Use float64
    inputs for an oracle.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    groups = q.shape[1] // k.shape[1]
    kh = k.repeat_interleave(groups, dim=1).transpose(0, 1)  # (Hq, Nk, D)
    vh = v.repeat_interleave(groups, dim=1).transpose(0, 1)
    scores = torch.matmul(q.transpose(0, 1), kh.transpose(1, 2)) * scale  # (Hq, Nq, Nk)
    scores = scores.masked_fill(~mask, float("-inf"))
    live = mask.any(1)  # (Nq,)
    if sinks is not None:
        sink_col = sinks.to(scores.dtype).view(-1, 1, 1).expand(-1, q.shape[0], 1)
        scores = torch.cat([scores, sink_col], dim=2)
    lse = torch.logsumexp(scores, dim=2)  # (Hq, Nq)
    probs = torch.exp(scores - torch.where(live, lse, 0.0).unsqueeze(-1))
    probs = torch.where(live.view(1, -1, 1), probs, 0.0)[..., : k.shape[0]]
    out = torch.matmul(probs, vh).transpose(0, 1)
    lse = torch.where(live, lse, float("-inf")).transpose(0, 1)
    return out, lse


def causal_document_tasks(doc_lengths: list[int]) -> TaskList:
    """Packed documents with causal masks: one ``(q=doc, kv=doc, causal)`` task per document."""
    q, start = [], 0
    for n in doc_lengths:
        q.append((start, start + n))
        start += n
    return make_task_list(q, q, [True] * len(q), start, start)


def multiturn_tasks(documents: list[list[tuple[int, bool]]]) -> TaskList:
    """GLM multi-turn masks (design §2) for documents given as ``[(turn_length, is_context)]``.

    Context turns are bidirectional within the turn, response turns causal; every token sees
    all earlier turns of its document. Turn ``t`` gives ``(q=turn, kv=[doc start, turn start),
    full)`` (when non-empty) and ``(q=turn, kv=turn, full or causal)``.
    """
    q, kv, causal, start = [], [], [], 0
    for turns in documents:
        doc_start = start
        for length, is_context in turns:
            turn = (start, start + length)
            if start > doc_start:
                q.append(turn)
                kv.append((doc_start, start))
                causal.append(False)
            q.append(turn)
            kv.append(turn)
            causal.append(not is_context)
            start += length
    return make_task_list(q, kv, causal, start, start)
