"""A group of rank actors in one placement group: start, rendezvous, call, detect death, stop."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from distca.config import DistcaConfig
from distca.train import watchdog
from distca.train.errors import RunFileError, WorkerDied, WorkerError
from distca.train.leftovers import rendezvous_dir
from distca.train.ray_cluster import is_loopback
from distca.train.worker import RankWorker, world_layout

PLACEMENT_TIMEOUT_S = 60.0
# After one rank fails, how long to wait for the others' results to tell a dead rank (restart
# from a checkpoint) from an error in the step itself (fatal).
FAILURE_GRACE_S = 3.0


class WorkerGroup:
    def __init__(self, cfg: DistcaConfig):
        self.cfg = cfg
        self.roles = world_layout(cfg)
        self.actors: list[Any] = []
        self.workers: list[dict] = []
        self._pg = None
        self._store_dir: str | None = None

    @property
    def world_size(self) -> int:
        return len(self.roles)

    def start(self) -> list[dict]:
        """Place and start every rank, rendezvous, build every rank's step; returns workers.json rows."""
        r = self.cfg.ray
        bundle = {"CPU": r.num_cpus_per_worker}
        if r.num_gpus_per_worker:
            bundle["GPU"] = r.num_gpus_per_worker
        self._pg = placement_group([dict(bundle)] * self.world_size, strategy="PACK")
        try:
            ray.get(self._pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except GetTimeoutError:
            raise WorkerError(
                f"the Ray cluster cannot place {self.world_size} ranks with {bundle} each "
                f"within {PLACEMENT_TIMEOUT_S:.0f} s; available: {ray.available_resources()} "
                f"(lower ray.num_cpus_per_worker / ray.num_gpus_per_worker or add nodes)"
            ) from None
        actor_cls = ray.remote(RankWorker)
        for rank, role in enumerate(self.roles):
            strategy = PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=rank)
            self.actors.append(actor_cls.options(
                num_cpus=r.num_cpus_per_worker, num_gpus=r.num_gpus_per_worker,
                scheduling_strategy=strategy, max_restarts=0, max_concurrency=1,
            ).remote(self.cfg, rank, self.world_size, role))
        self.workers = self.call("info")
        self.call("setup", self._rendezvous())
        return self.workers

    def _rendezvous(self) -> str:
        """The ``init_method``: all ranks on one loopback node share a file store (no socket
        at all); otherwise rank 0 hosts a TCP store on its node's address."""
        nodes = {w["node"] for w in self.workers}
        head = self.workers[0]["node"]
        if len(nodes) == 1 and is_loopback(head):
            self._store_dir = rendezvous_dir()
            return f"file://{self._store_dir}/store"
        port = ray.get(self.actors[0].listen.remote(head))
        return f"tcp://{head}:{port}"

    def call(self, method: str, *args: Any, timeout: float | None = None,
             setting: str = "") -> list[Any]:
        """Call ``method`` on every rank; returns the results in rank order.

        Raises :class:`WorkerDied` as soon as a rank's process is gone, :class:`WorkerError`
        when a rank raised, and :class:`~distca.train.watchdog.WorkerStalled` when not every
        rank answered within ``timeout`` seconds (``setting``: the key it came from). Without
        ``timeout``: ``trainer.call_timeout_s`` (0: no limit).
        """
        if timeout is None and self.cfg.trainer.call_timeout_s > 0:
            timeout = self.cfg.trainer.call_timeout_s
            setting = f"trainer.call_timeout_s={timeout:g}"
        refs = [getattr(actor, method).remote(*args) for actor in self.actors]
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        pending = list(refs)
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not ready:
                waiting = sorted(rank_of[r] for r in pending)
                if not self.workers:  # "info": the ranks are still starting, no pid to name
                    raise watchdog.WorkerStalled(f"ranks {waiting} did not start within "
                                                 f"{timeout:.0f} s ({setting})")
                error = watchdog.stalled(self.workers, waiting, method, timeout, setting)
                watchdog.kill(self.workers, error.ranks)
                raise error
            try:
                ray.get(ready[0])
            except Exception as first:
                self._raise_failure(first, rank_of[ready[0]], pending, rank_of, method)
        return ray.get(refs)

    def _raise_failure(self, first: Exception, rank: int, pending: list, rank_of: dict,
                       method: str) -> None:
        failures = [(rank, first)]
        done = (ray.wait(pending, num_returns=len(pending), timeout=FAILURE_GRACE_S)[0]
                if pending else [])
        for ref in done:
            try:
                ray.get(ref)
            except Exception as exc:
                failures.append((rank_of[ref], exc))
        dead = {r: exc for r, exc in failures if isinstance(exc, ActorDiedError | RayActorError)}
        if dead:
            first = min(dead)
            who = (f" (pid {self.workers[first]['pid']} on {self.workers[first]['node']})"
                   if self.workers else "")
            lines = str(dead[first]).splitlines()
            # Ray says why (the OOM killer, its memory monitor) further down its message
            memory = [line.strip() for line in lines[1:] if "memory" in line.lower()][:1]
            raise WorkerDied(f"rank {first}{who} died during {method}: "
                             + " ".join(lines[:1] + memory))
        cause = getattr(first, "cause", None)  # what the rank raised, inside RayTaskError
        if method == "save" and isinstance(cause, OSError):  # a full disk: one line, no trace
            raise RunFileError(Path(cause.filename or "checkpoint"), cause)
        raise WorkerError(f"rank {rank} failed in {method}: {first}")

    def shutdown(self) -> None:
        """Stop every actor and release the placement group (safe to call twice)."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None
        if self._store_dir is not None:
            shutil.rmtree(self._store_dir, ignore_errors=True)
            self._store_dir = None
