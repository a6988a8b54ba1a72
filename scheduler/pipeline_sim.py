"""Pipeline schedules played as event simulations: 1F1B (colocated attention) and lock-step ticks.

Both take per-operation *work* in seconds and return the critical path, so a micro-batch that
carries more attention than its neighbours stalls the stages after and before it exactly as the
schedule dictates (no constant bubble factor).

* :func:`pipeline_seconds`: every pipeline (one per data-parallel replica or CP group) runs the
  1F1B order of :func:`one_f_one_b_order` on each stage: an operation starts once its stage is
  free and its input exists (a forward after the previous stage's forward of that micro-batch, a
  backward after the next stage's backward). The runtime's colocated schedule
  (``distca.parallel.pipeline.run_1f1b``) keeps the same order.
* :func:`lockstep_ticks`: the timetable of the lock-step schedule disaggregated attention runs
  (the runtime's ``distca.parallel.pipeline.run_lockstep`` plays this very timetable): in every
  tick each stage runs one forward, one backward or nothing, and all ranks meet in every tick's
  attention exchanges, so a tick lasts as long as its slowest rank (:func:`ticks_seconds`).

Optional processor sharing (for calibration on a CPU whose cores the ranks share): while ``n``
ranks compute next to ``others`` outside runnable threads, each advances at
``min(1, cores / (n + others))`` seconds of work per second; a rank waiting on its input uses no
core. Without ``cores`` every rank has a processor of its own.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import numpy as np


class Pass(enum.StrEnum):
    """The pass of a micro-batch that a stage runs (a str: it equals and prints as F / B)."""

    FORWARD = "F"
    BACKWARD = "B"


FORWARD, BACKWARD = Pass.FORWARD, Pass.BACKWARD


class TickOp(NamedTuple):
    """One operation of a stage: the forward or backward of one micro-batch."""

    kind: Pass
    micro_batch: int


# One tick of the lock-step timetable: per stage its TickOp, or None (bubble).
TickRow = tuple[TickOp | None, ...]


def one_f_one_b_order(stage: int, stages: int, micro_batches: int) -> list[TickOp]:
    """Stage ``stage``'s 1F1B order: ``min(stages-stage-1, M)`` warm-up forwards, then one forward
    and one backward alternately, then the remaining backwards (cool-down)."""
    warmup = min(stages - stage - 1, micro_batches)
    order = [TickOp(FORWARD, i) for i in range(warmup)]
    for j in range(micro_batches - warmup):
        order += [TickOp(FORWARD, warmup + j), TickOp(BACKWARD, j)]
    return order + [TickOp(BACKWARD, i) for i in range(micro_batches - warmup, micro_batches)]


def _input_stage(kind: str, stage: int) -> int:
    """The stage whose output an operation needs (-1 or ``stages``: none)."""
    return stage - 1 if kind == FORWARD else stage + 1


def pipeline_seconds(fwd: np.ndarray, bwd: np.ndarray, cores: float | None = None,
                     others: float = 0.0) -> float:
    """Seconds until the last of ``R`` independent 1F1B pipelines finishes.

    fwd, bwd: (R, S, M) seconds of work of the forward / backward of micro-batch ``m`` on stage
    ``s`` of pipeline ``r``. cores/others: processor sharing over all ``R·S`` ranks (module
    docstring); None: a processor per rank. Activation transfers between stages are free.
    """
    work = np.stack([np.asarray(fwd, dtype=np.float64), np.asarray(bwd, dtype=np.float64)])
    _, pipes, stages, micro = work.shape
    orders = [one_f_one_b_order(s, stages, micro) for s in range(stages)]
    finished = np.zeros((2, pipes, stages, micro), dtype=bool)
    position = np.zeros((pipes, stages), dtype=np.int64)
    remaining = np.zeros((pipes, stages))
    running = np.zeros((pipes, stages), dtype=bool)
    clock = 0.0
    tiny = 1e-12 * max(1.0, float(work.sum()))
    while True:
        for r, s in zip(*np.nonzero(~running)):
            if position[r, s] == len(orders[s]):
                continue
            kind, i = orders[s][position[r, s]]
            k, source = int(kind == "B"), _input_stage(kind, s)
            if 0 <= source < stages and not finished[k, r, source, i]:
                continue
            remaining[r, s], running[r, s] = work[k, r, s, i], True
        busy = int(running.sum())
        if busy == 0:
            break
        rate = 1.0 if cores is None else min(1.0, cores / (busy + others))
        step = remaining[running].min()
        clock += step / rate
        remaining[running] -= step
        for r, s in zip(*np.nonzero(running & (remaining <= tiny))):
            kind, i = orders[s][position[r, s]]
            finished[int(kind == "B"), r, s, i] = True
            position[r, s] += 1
            running[r, s] = False
    if not finished.all():  # 1F1B cannot deadlock; this guards the dependency rules above
        raise RuntimeError("1F1B simulation stalled")
    return clock


def lockstep_ticks(stages: int, micro_batches: int, backward: bool = True) -> list[TickRow]:
    """The lock-step timetable: each stage keeps its 1F1B order (so at most ``stages``
    micro-batches are in flight per stage; forwards only if not ``backward``, as in evaluation)
    and runs an operation in the first tick after its input was produced; a row holds one entry
    per stage (None: bubble)."""
    orders = [one_f_one_b_order(s, stages, micro_batches) if backward
              else [TickOp(FORWARD, i) for i in range(micro_batches)] for s in range(stages)]
    done: dict[tuple[Pass, int, int], int] = {}  # (kind, stage, micro-batch) -> tick
    position = [0] * stages
    ticks: list[TickRow] = []
    while any(p < len(o) for p, o in zip(position, orders)):
        tick, row = len(ticks), []
        for s, (p, order) in enumerate(zip(position, orders)):
            op = order[p] if p < len(order) else None
            if op is not None:
                source = _input_stage(op[0], s)
                if 0 <= source < stages and done.get((op[0], source, op[1]), tick) >= tick:
                    op = None
            row.append(op)
        for s, op in enumerate(row):
            if op is not None:
                done[(op[0], s, op[1])] = tick
                position[s] += 1
        ticks.append(tuple(row))
    return ticks


def shared_finish(work: np.ndarray, cores: float | None = None, others: float = 0.0) -> float:
    """Seconds until the last of these works (seconds, one per rank, started together) finishes:
    the largest without ``cores``; with them, under processor sharing where a finished rank
    frees its share."""
    work = np.sort(np.asarray(work, dtype=np.float64).ravel())
    if cores is None:
        return float(work[-1]) if work.size else 0.0
    clock, done = 0.0, 0.0
    for i, w in enumerate(work):
        clock += (w - done) / min(1.0, cores / (work.size - i + others))
        done = w
    return clock


def ticks_seconds(tick_work: np.ndarray, cores: float | None = None,
                  others: float = 0.0) -> float:
    """Seconds of a lock-step step: tick_work (ticks, ranks) seconds of work of every rank in
    every tick (its linear layers and the attention it serves); ranks meet at the end of every
    tick, so ticks add up. With equal layers a tick's rounds are scaled copies of the tick, and
    :func:`shared_finish` is homogeneous, so timing the tick as one round is exact."""
    return float(sum(shared_finish(row, cores, others) for row in np.asarray(tick_work)))
