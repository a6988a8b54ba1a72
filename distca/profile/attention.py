"""``distca profile attention``: core-attention throughput per task shape on this device.

For every ``(q_len, kv_len, mask)`` of the grid it times forward + backward of
:func:`distca.attention.core_attention` over a varlen list of identical tasks (enough copies
that one call does at least ``min_pairs`` score pairs, within ``MAX_BATCH_TOKENS`` tokens, so
per-call overhead is spread the way it is on an attention server that runs all its tasks in
one call). Causal masks are aligned bottom-right as in :mod:`distca.attention.tasks`. The
result is the CSV that :class:`distca.scheduler.CostTable` reads:
``q_len,kv_len,mask,pairs_per_s`` plus the raw seconds and TFLOP/s for people.
"""

from __future__ import annotations

import csv
import statistics
import time
from pathlib import Path

import torch

from distca.scheduler import attention_flops_per_pair, task_pairs

MASKS = ("causal", "full")
CSV_COLUMNS = ("q_len", "kv_len", "mask", "pairs_per_s", "seconds_per_task", "tflops")
# Query plus key tokens of one timed call at most: tiny shapes would otherwise take millions of
# copies to reach min_pairs (1x1 tasks: 2M tokens, 4 GB on the tiny model and tens of GB on
# llama3-8b's heads), while 64K tokens of tasks already spread the per-call overhead thin.
MAX_BATCH_TOKENS = 1 << 16


def batch_copies(q_len: int, kv_len: int, causal: bool, min_pairs: int) -> int:
    """Identical tasks per timed call: enough for ``min_pairs`` score pairs, but no more than
    ``MAX_BATCH_TOKENS`` query + key tokens (and at least one task)."""
    wanted = -(-min_pairs // int(task_pairs(q_len, kv_len, causal)))
    return max(1, min(wanted, MAX_BATCH_TOKENS // (q_len + kv_len)))


def time_shape(q_len: int, kv_len: int, causal: bool, heads: int, kv_heads: int, head_dim: int,
               backend: str, dtype: torch.dtype, device: torch.device, min_pairs: int,
               reps: int, clock: str = "wall") -> float:
    """Median over ``reps`` timed passes of the seconds per task of one forward + backward
    (after one warm-up pass); the median, not the best, because the table predicts typical
    steps on a machine whose load varies. clock ``cpu`` counts this process's CPU seconds
    instead of wall seconds: with one thread, the time the work takes on a core of its own
    even when other jobs share the machine."""
    timer = time.process_time if clock == "cpu" else time.perf_counter
    from distca.attention import core_attention, make_task_list

    copies = batch_copies(q_len, kv_len, causal, min_pairs)
    gen = torch.Generator().manual_seed(q_len * 7919 + kv_len)

    def randn(tokens: int, h: int) -> torch.Tensor:
        x = torch.randn(tokens, h, head_dim, generator=gen, dtype=torch.float32)
        return x.to(device=device, dtype=dtype).requires_grad_()

    q, k, v = randn(copies * q_len, heads), randn(copies * kv_len, kv_heads), \
        randn(copies * kv_len, kv_heads)
    grad = torch.randn(q.shape, generator=gen).to(device=device, dtype=dtype)
    idx = torch.arange(copies, dtype=torch.int64)
    tasks = make_task_list(torch.stack([idx * q_len, (idx + 1) * q_len], 1),
                           torch.stack([idx * kv_len, (idx + 1) * kv_len], 1),
                           torch.full((copies,), causal), q.shape[0], k.shape[0])
    times = []
    for rep in range(reps + 1):
        q.grad = k.grad = v.grad = None
        _sync(device)
        start = timer()
        out, _ = core_attention(q, k, v, tasks, None, None, backend=backend)
        out.backward(grad)
        _sync(device)
        if rep:  # the first pass warms caches and kernels up
            times.append(timer() - start)
    return statistics.median(times) / copies


def profile_attention(q_lens: list[int], kv_lens: list[int], masks: list[str], heads: int,
                      kv_heads: int, head_dim: int, backend: str = "auto",
                      dtype: torch.dtype | None = None, min_pairs: int = 1 << 20,
                      reps: int = 3, clock: str = "wall") -> dict:
    """Measure the grid; returns ``{"backend", "device", "dtype", "heads", "kv_heads",
    "head_dim", "rows": [{q_len, kv_len, mask, pairs_per_s, seconds_per_task, tflops}]}``."""
    from distca.attention.core import resolve_backend

    if not q_lens or not kv_lens or min(q_lens + kv_lens) < 1:
        raise ValueError("q and kv lengths must be positive")
    unknown = sorted(set(masks) - set(MASKS))
    if not masks or unknown:
        raise ValueError(f"masks must be among {MASKS}, got {masks}")
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be wall or cpu, got {clock!r}")
    if reps < 1:
        raise ValueError(f"need at least one timed repeat per point, got {reps}")
    if heads < 1 or kv_heads < 1 or head_dim < 1 or heads % kv_heads:
        raise ValueError(f"need heads a multiple of kv_heads, all >= 1 (got {heads}, "
                         f"{kv_heads}, {head_dim})")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if clock == "cpu" and device.type != "cpu":
        raise ValueError("clock cpu times CPU work only; a GPU table needs the wall clock")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    name = resolve_backend(backend, device).__name__.rsplit(".", 1)[-1].removesuffix("_backend")
    per_pair = attention_flops_per_pair(heads, head_dim)
    rows = []
    for mask in masks:
        for q_len in sorted(set(q_lens)):
            for kv_len in sorted(set(kv_lens)):
                causal = mask == "causal"
                seconds = time_shape(q_len, kv_len, causal, heads, kv_heads, head_dim, name,
                                     dtype, device, min_pairs, reps, clock)
                rate = task_pairs(q_len, kv_len, causal) / seconds
                rows.append({"q_len": q_len, "kv_len": kv_len, "mask": mask,
                             "pairs_per_s": rate, "seconds_per_task": seconds,
                             "tflops": rate * per_pair / 1e12})
    return {"backend": name, "device": _device_name(device), "dtype": str(dtype).split(".")[-1],
            "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "threads": torch.get_num_threads(), "repeats": reps, "clock": clock,
            "rows": rows}


def write_table(rows: list[dict], path: str | Path) -> None:
    """The rows as the CSV :meth:`CostTable.from_csv` reads."""
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k])
                             for k in CSV_COLUMNS})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return platform.processor() or platform.machine() or "cpu"
