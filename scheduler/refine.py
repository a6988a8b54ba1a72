"""A clean-up pass after planning: move whole received bands to the receivers that need fewest bytes.

The planner cuts pieces one at a time, so a band can end up on a server holding none of its
document's kv (it pays the whole kv prefix) while a server that holds that kv filled its room with
another donor's band. Here a *band* is everything one server runs of one document on query rows
it does not own (the pieces it received). A band moves to another server when the dispatch bytes
drop and the receiver stays at or under the cap; when the receiver lacks the room, one of its own
bands may leave for a third server (or swap places) if the two moves together save bytes.

Bytes are counted exactly as ``Plan.transfers`` does, per (server, document): the union of the
server's q ranges and of its kv ranges of that document, less the tokens the server owns. Tasks
never change shape, so costs, coverage and the load sum are untouched; every server ends at or
under ``max(cap, its load before)``. Passes repeat until no move helps (at most ``_PASSES``), in a
fixed order, so the result is deterministic.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

_PASSES = 4
_EJECT_TRIED = 2  # receivers (most bytes saved first) that may eject a band to make room


def refine_receivers(columns, units: np.ndarray, cap: float, tokens_per_worker: int,
                     num_servers: int, q_bytes: int, kv_bytes: int):
    """Reassign received bands to cut dispatch bytes; returns columns with a new server column.

    columns: task columns (server, doc, q_start, q_end, kv_start, kv_end, causal), (N,) each,
    int64 (causal bool). units: (N,) float64 planning cost of every task (score pairs or
    predicted seconds). cap: the most a receiver may hold after a move, in the same units.
    """
    server = columns[0].astype(np.int64).tolist()
    doc = columns[1].tolist()
    q = list(zip(columns[2].tolist(), columns[3].tolist()))
    kv = list(zip(columns[4].tolist(), columns[5].tolist()))
    cost = units.tolist()
    size = tokens_per_worker
    load = [0.0] * num_servers
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    holders: dict[int, set[int]] = defaultdict(set)
    for t, (s, d) in enumerate(zip(server, doc)):
        if q[t][1] <= q[t][0] or kv[t][1] <= kv[t][0]:
            continue  # an empty task (a segment with no rows left): make_tasks drops it
        load[s] += cost[t]
        groups[(s, d)].append(t)
        holders[d].add(s)
        holders[d].update(range(kv[t][0] // size, (kv[t][1] - 1) // size + 1))  # token owners
    state = _State(server, doc, q, kv, cost, size, load, groups, holders, cap, q_bytes, kv_bytes)
    for _ in range(_PASSES):
        if not state.one_pass():
            break
    out = list(columns)
    out[0] = np.array(state.server, dtype=np.int64)
    return tuple(out)


class _State:
    """The task table as Python lists plus per-(server, document) groups, mutated by moves."""

    def __init__(self, server, doc, q, kv, cost, size, load, groups, holders, cap, q_bytes,
                 kv_bytes):
        self.server, self.doc, self.q, self.kv, self.cost = server, doc, q, kv, cost
        self.size, self.load, self.groups, self.holders = size, load, groups, holders
        self.cap, self.q_bytes, self.kv_bytes = cap, q_bytes, kv_bytes
        self.docs_on: dict[int, set[int]] = defaultdict(set)
        for s, d in groups:
            self.docs_on[s].add(d)

    def band(self, s: int, d: int) -> list[int]:
        """Tasks of ``d`` on ``s`` whose query rows ``s`` does not own (what it received)."""
        return [t for t in self.groups.get((s, d), ()) if self.q[t][0] // self.size != s]

    def bytes(self, s: int, tasks: list[int]) -> int:
        """Dispatch bytes of these tasks (one document) on server ``s``."""
        own = (s * self.size, (s + 1) * self.size)
        return (_outside([self.q[t] for t in tasks], own) * self.q_bytes
                + _outside([self.kv[t] for t in tasks], own) * self.kv_bytes)

    def saving(self, s: int, d: int, tasks: list[int]) -> int:
        """Bytes ``s`` stops paying when ``tasks`` (of ``d``) leave it."""
        group = self.groups[(s, d)]
        rest = [t for t in group if t not in tasks]
        return self.bytes(s, group) - self.bytes(s, rest)

    def extra(self, r: int, d: int, tasks: list[int]) -> int:
        """Bytes ``r`` starts paying when ``tasks`` (of ``d``) arrive there."""
        group = self.groups.get((r, d), [])
        return self.bytes(r, group + tasks) - self.bytes(r, group)

    def one_pass(self) -> bool:
        """Try every band once, in (server, document) order; True if any move was made."""
        bands = sorted(key for key in self.groups if self.band(*key))
        moved = False
        for s, d in bands:
            tasks = self.band(s, d)
            if tasks and self.improve(s, d, tasks):
                moved = True
        return moved

    def improve(self, s: int, d: int, tasks: list[int]) -> bool:
        """Move band ``tasks`` of ``d`` off ``s`` (maybe ejecting one band of the receiver) if
        that saves bytes; the largest saving wins, ties to the lowest server ids."""
        weight = sum(self.cost[t] for t in tasks)
        save = self.saving(s, d, tasks)
        best = (0, None, None, None)  # (net bytes saved, receiver, ejected band, its target)
        gains = []
        for r in sorted(self.holders[d] - {s}):
            if r < len(self.load):
                gain = save - self.extra(r, d, tasks)
                if gain > 0:
                    gains.append((-gain, r))
        gains.sort()
        least = None
        for k, (neg, r) in enumerate(gains):
            gain = -neg
            if gain <= best[0]:
                break
            if self.load[r] + weight <= self.cap:
                best = (gain, r, None, None)
                break
            if k >= _EJECT_TRIED:
                continue
            for e in sorted(self.docs_on[r] - {d}):
                ejected = self.band(r, e)
                out = sum(self.cost[t] for t in ejected)
                if not ejected or self.load[r] + weight - out > self.cap:
                    continue
                back = self.saving(r, e, ejected)
                if least is None:
                    least = min(range(len(self.load)), key=self.load.__getitem__)
                for r2 in self.targets(e, r, s, least):
                    room = self.cap - self.load[r2] + (weight if r2 == s else 0.0)
                    if out > room:
                        continue
                    net = gain + back - self.extra(r2, e, ejected)
                    if net > best[0]:
                        best = (net, r, (e, ejected), r2)
        net, r, ejected, r2 = best
        if r is None:
            return False
        self.move(tasks, s, r, d)
        if ejected is not None:
            self.move(ejected[1], r, r2, ejected[0])
        return True

    def targets(self, e: int, r: int, s: int, least: int) -> list[int]:
        """Where an ejected band of ``e`` may go: holders of ``e``, the donor ``s`` (a swap),
        and the least loaded server."""
        picked = {h for h in self.holders[e] if h < len(self.load)} | {s, least}
        picked.discard(r)
        return sorted(picked)

    def move(self, tasks: list[int], s: int, r: int, d: int) -> None:
        group = self.groups[(s, d)]
        for t in tasks:
            group.remove(t)
            self.server[t] = r
            self.groups[(r, d)].append(t)
            self.load[s] -= self.cost[t]
            self.load[r] += self.cost[t]
        if not group:
            del self.groups[(s, d)]
            self.docs_on[s].discard(d)
        self.holders[d].add(r)
        self.docs_on[r].add(d)


def _outside(spans: list[tuple[int, int]], own: tuple[int, int]) -> int:
    """Tokens in the union of ``spans`` that fall outside ``own``."""
    total, reach = 0, None
    for lo, hi in sorted(spans):
        if reach is not None and lo < reach:
            lo = reach
        if hi <= lo:
            continue
        reach = hi
        total += (hi - lo) - max(0, min(hi, own[1]) - max(lo, own[0]))
    return total
