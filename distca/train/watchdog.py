"""The step watchdog: a rank that stops making progress is treated like a dead one.

A stopped (SIGSTOP), swapped-out or deadlocked rank never fails; without a deadline the
driver would wait for it forever (gloo's own timeout is ten minutes, and NCCL's may be
longer). :func:`step_timeout` is a step's deadline, ``trainer.step_timeout_s`` or sized from
the steps measured so far; every other call (setup, checkpoint save and load, init_from, which
can hang on a file system as well) has ``trainer.call_timeout_s``. When it passes,
:func:`stalled` looks at the process of every rank that has not answered, on its own node (a
zero-CPU Ray task reads ``/proc``), to name the culprit: a stopped process if there is one,
else every rank still waiting. The driver then kills those processes (:func:`kill`) and
restarts the group from the last checkpoint, as it does after a death.
"""

from __future__ import annotations

import os
import signal

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from distca.train.errors import WorkerDied

FIRST_STEP_TIMEOUT_S = 600.0  # the first step of a group warms up (kernels, allocator)
MIN_STEP_TIMEOUT_S = 60.0
STEP_TIMEOUT_FACTOR = 10.0  # times the slowest step so far
PROBE_TIMEOUT_S = 30.0
STATES = {"R": "running", "S": "sleeping", "D": "in uninterruptible I/O", "T": "stopped",
          "t": "stopped by a debugger", "Z": "a zombie", "gone": "gone"}


class WorkerStalled(WorkerDied):
    """A rank made no progress within the step timeout: restartable, like a death."""


def step_timeout(configured: float, slowest_step: float | None) -> float:
    """``trainer.step_timeout_s`` when set (> 0), else ten times the slowest step measured so
    far, at least a minute. ``slowest_step`` None: a group's first step, which warms up
    (kernels, allocator), gets at least ten minutes either way."""
    if slowest_step is None:
        return max(configured, FIRST_STEP_TIMEOUT_S)
    if configured > 0:
        return configured
    return max(MIN_STEP_TIMEOUT_S, STEP_TIMEOUT_FACTOR * slowest_step)


def _on_node(pids: list[int], kill: bool) -> dict[int, str]:
    """Runs on the ranks' node: each pid's state letter (or "gone"); SIGKILL first if asked."""
    states = {}
    for pid in pids:
        try:
            if kill:
                os.kill(pid, signal.SIGKILL)
            with open(f"/proc/{pid}/stat") as f:
                states[pid] = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            states[pid] = "gone"
    return states


def _each_node(workers: list[dict], ranks: list[int], kill: bool) -> dict[int, str]:
    """Rank -> process state of ``ranks``, read (after SIGKILL if ``kill``) on their nodes."""
    probe = ray.remote(num_cpus=0, max_retries=0)(_on_node)
    by_node: dict[str, list[int]] = {}
    for rank in ranks:
        by_node.setdefault(workers[rank]["node_id"], []).append(rank)
    refs = {node: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
            .remote([workers[r]["pid"] for r in node_ranks], kill)
            for node, node_ranks in by_node.items()}
    states: dict[int, str] = {}
    for node, ref in refs.items():
        try:
            found = ray.get(ref, timeout=PROBE_TIMEOUT_S)
        except Exception:  # the node itself is unreachable: say so rather than guess
            found = {}
        for rank in by_node[node]:
            states[rank] = found.get(workers[rank]["pid"], "unknown")
    return states


def step_setting(configured: float) -> str:
    """Where a step's timeout came from, for the error: ``trainer.step_timeout_s``."""
    return (f"trainer.step_timeout_s={configured:g}" if configured > 0 else
            "trainer.step_timeout_s=0: sized from the measured step time")


def stalled(workers: list[dict], waiting: list[int], method: str, timeout: float,
            setting: str) -> WorkerStalled:
    """The error naming the rank(s) that stalled ``method``: stopped processes if any, else
    every rank that has not answered. ``setting``: the key the timeout came from."""
    states = _each_node(workers, waiting, kill=False)
    stopped = [r for r in waiting if states[r] in ("T", "t", "D", "gone")]
    culprits = stopped or waiting
    named = "; ".join(f"rank {r} (pid {workers[r]['pid']} on {workers[r]['node']}, "
                      f"{STATES.get(states[r], states[r])})" for r in culprits)
    error = WorkerStalled(f"{named} made no progress in {method} for {timeout:.0f} s ({setting})")
    error.ranks = culprits
    return error


def kill(workers: list[dict], ranks: list[int]) -> None:
    """SIGKILL the processes of ``ranks`` on their nodes (a stopped process cannot act on
    Ray's request to exit)."""
    _each_node(workers, ranks, kill=True)
