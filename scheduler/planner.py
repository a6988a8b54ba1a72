"""The communication-aware balancing planner and the ``plan_step`` entry point (design §4).

Start from colocated attention: every segment (a turn cut at worker boundaries) runs on the
worker that holds its queries. Servers above ``cap = (1+ε)·mean`` shed exactly their excess to
servers below it, biggest room first. What they shed is cut to move the most score pairs per byte:

* the *tail band* of a segment's rows: the last rows of a causal turn see the longest kv prefix,
  so they carry the most pairs per query token;
* only the kv columns next to the diagonal when the receiver needs less than the whole band
  (a kv split): the band's rows keep their far-left columns at home as a full task. For a piece
  of ``r`` pairs, ``a`` query rows by ``K`` kv columns costs ``a·q_bytes + K·kv_bytes``, least at
  ``a ≈ sqrt(r·kv_bytes/q_bytes)``: the band height is chosen there.

With a throughput table the planner balances predicted seconds. Cutting changes the total (a
thin band runs slower than the rows it leaves), so the cap follows the current mean and the
granularity is one ``min_shard_tokens``-row whole band (see ``_grain_units``).

Every cut leaves pieces of at least ``min_shard_tokens`` rows and kv columns (or the whole range).
Each piece is one CA-task; the segment's untouched rows and the kept left columns stay as tasks on
the home worker, so the tasks tile each document's mask exactly once. Python loops run over pieces
(about one per receiver), never over server pairs or tokens.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Sequence

import numpy as np
from distca.scheduler.cost import CostTable, ModelShape
from distca.scheduler.cutting import Cutter
from distca.scheduler.documents import (
    Document,
    DocumentBatch,
    Segments,
    as_document_batch,
    build_segments,
    task_pairs,
)
from distca.scheduler.plan import Plan, imbalance, make_tasks
from distca.scheduler.prefixes import spare_prefix_imports

PLANNERS = ("distca", "greedy-baseline")


def plan_step(docs: DocumentBatch | Sequence[Document], num_workers: int, tokens_per_worker: int,
              num_servers: int | None = None, tolerance: float = 0.1,
              min_shard_tokens: int = 128, model: ModelShape | None = None,
              planner: str = "distca", cost_table: CostTable | None = None) -> Plan:
    """Plan one step: which server computes which CA-task.

    docs: the step's documents (``documents_from_batch``), back to back from token 0 and fitting
    in ``num_workers * tokens_per_worker`` tokens. num_servers defaults to num_workers; servers
    ``>= num_workers`` are dedicated (hold no tokens). tolerance ε >= 0: target
    ``max <= (1+ε)·mean`` of server cost. cost_table: optional measured throughput; with it the
    planner balances predicted seconds instead of score pairs (the plan still reports pairs).
    """
    batch = as_document_batch(docs)
    num_servers = num_workers if num_servers is None else num_servers
    model = model or ModelShape()
    _check(batch, num_workers, tokens_per_worker, num_servers, tolerance, min_shard_tokens,
           planner)
    segments = build_segments(batch, tokens_per_worker)
    before = np.zeros(num_servers, dtype=np.int64)
    np.add.at(before, segments.home, segments.pairs())
    if planner == "distca":
        columns = balance(segments, num_servers, tolerance, min_shard_tokens, model, cost_table)
    else:
        from distca.scheduler.greedy_baseline import balance_greedy

        columns = balance_greedy(segments, batch, num_servers, tolerance, model)
    return Plan(make_tasks(*columns), num_workers, tokens_per_worker, num_servers, model,
                imbalance(before))


def timed_plan_step(*args, **kwargs) -> tuple[Plan, float]:
    """``plan_step`` plus its wall time in milliseconds."""
    start = time.perf_counter()
    plan = plan_step(*args, **kwargs)
    return plan, (time.perf_counter() - start) * 1e3


def _check(batch, num_workers, tokens_per_worker, num_servers, tolerance, min_shard, planner):
    if planner not in PLANNERS:
        raise ValueError(f"planner must be one of {PLANNERS}, got {planner!r}")
    if num_workers < 1 or tokens_per_worker < 1:
        raise ValueError(f"need num_workers >= 1 and tokens_per_worker >= 1, got "
                         f"{num_workers} and {tokens_per_worker}")
    if num_servers < num_workers:
        raise ValueError(f"num_servers={num_servers} < num_workers={num_workers}: every worker "
                         "is also a server")
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise ValueError(f"tolerance must be a finite value >= 0, got {tolerance}")
    if min_shard < 1:
        raise ValueError(f"min_shard_tokens must be >= 1, got {min_shard}")
    if batch.num_tokens > num_workers * tokens_per_worker:
        raise ValueError(f"documents hold {batch.num_tokens} tokens, more than "
                         f"{num_workers} workers x {tokens_per_worker}")


def grain_pairs(seg: Segments, min_shard: int) -> int:
    """The planner's granularity in score pairs: one row of the densest segment, or the
    smallest piece (``min_shard`` rows by ``min_shard`` kv columns) if that is larger.

    With ε = 0 the bound ``max <= mean`` is impossible at token granularity in general, so the
    planner aims at ``max((1+ε)·mean, mean + grain)``.
    """
    density = seg.kv_end - seg.kv_start
    return int(max(density.max(initial=0), min_shard * min_shard))


def _grain_units(seg: Segments, min_shard: int, cost_table: CostTable | None) -> float:
    """``grain_pairs`` in planning units; with a table, seconds of the costliest minimum band.

    With a throughput table a kv split is no longer free: the columns it keeps home run as a
    thin task slower than the rows they came from, so a narrow piece can shed less time than it
    adds (or none). The pieces that reliably shed are whole-kv tail bands of ``min_shard`` rows,
    so the granularity is the predicted seconds of the costliest such band.
    """
    grain = float(grain_pairs(seg, min_shard))
    if cost_table is None:
        return grain
    rows = np.minimum(seg.q_end - seg.q_start, min_shard)
    cols = seg.kv_end - seg.kv_start
    band = task_pairs(rows, cols, seg.causal)
    seconds = cost_table.seconds(rows, cols, band)
    return max(grain / float(cost_table.throughput(min_shard, grain_pairs(seg, 1))),
               float(seconds.max(initial=0.0)))


def _home_weight(seg: Segments, cutter: Cutter, cost_table: CostTable | None) -> np.ndarray:
    """(N,) float64 planning cost of every segment's home task."""
    if cost_table is None:
        return seg.pairs().astype(np.float64)
    return np.array([cutter.home_units(i, int(seg.q_end[i])) for i in range(len(seg))])


def imbalance_floor(docs: DocumentBatch | Sequence[Document], tokens_per_worker: int,
                    num_servers: int, min_shard_tokens: int = 128,
                    cost_table: CostTable | None = None) -> float:
    """``1 + grain/mean``: the imbalance the planner aims at, and reaches, at ε = 0 wherever
    the donors' last rows can be cut to fit the rooms left. Where a donor's last segment has
    fewer than two minimum shards of rows left, each wider than any room, it moves them whole
    and overshoots: by at most 0.53 of a band of ``min_shard_tokens`` rows of the longest
    document in 3600 measured cases (~1% of small random batches at a minimum shard of 16);
    the property test allows the larger of the floor and one such band.

    In score pairs, or in the table's predicted seconds (summed over each server's tasks) when
    a cost table is given; the planner's bound is ``max(1 + ε, imbalance_floor)``.
    """
    seg = build_segments(as_document_batch(docs), tokens_per_worker)
    cutter = Cutter(seg, min_shard_tokens, ModelShape(), cost_table)
    total = float(_home_weight(seg, cutter, cost_table).sum())
    if total <= 0:
        return 1.0
    return 1.0 + _grain_units(seg, min_shard_tokens, cost_table) * num_servers / total


def balance(seg: Segments, num_servers: int, tolerance: float, min_shard: int,
            model: ModelShape, cost_table: CostTable | None):
    """Run the planner; returns task columns (server, doc, q_start, q_end, kv_start, kv_end,
    causal) for ``make_tasks``.

    Donors (servers above the cap) shed their excess one piece at a time. Each donor's piece is
    the cheapest in bytes per unit of cost among its densest segments and the receivers that
    already hold kv of that segment's document or have the most room; across donors the cheapest
    piece is cut first (a min-heap of lazily repriced donors), so a kv holder's scarce room goes
    to the donor it saves most for, not to whichever donor came first. A donor's costly last
    piece may be relayed through a full kv holder instead (``_relay``).
    """
    cutter = Cutter(seg, min_shard, model, cost_table)
    weight = _home_weight(seg, cutter, cost_table)
    load = np.bincount(seg.home, weights=weight, minlength=num_servers)
    rooms = _Rooms(load, tolerance, _grain_units(seg, min_shard, cost_table))
    # A lend moves room from the holder to the home. At ε = 0 the rooms add up to the excess
    # exactly and a holder's room is the cheapest a donor of that document can use (measured:
    # lending at ε = 0 took pretrain 64×128K from 0.670 to 0.678 of the greedy's bytes).
    spare_prefix_imports(cutter, load, rooms.cap, weight, lend=tolerance > 0)
    rooms.reset(load)
    done = 1e-12 * rooms.total / num_servers
    need = load - rooms.cap
    donors = [int(d) for d in np.lexsort((np.arange(num_servers), -need)) if need[d] > done]
    # Densest segments first: the last row of a segment sees the longest kv range.
    density = seg.kv_end - seg.kv_start
    by_home = np.lexsort((np.arange(len(seg)), -density, seg.home))
    bounds = np.searchsorted(seg.home[by_home], np.arange(num_servers + 1))
    queues = {d: [int(i) for i in by_home[bounds[d]:bounds[d + 1]]] for d in range(num_servers)}
    # With slack (ε > 0) the donor with the cheapest piece cuts first: heap entries are (bytes
    # per unit, donor, receiver's version when priced, the piece); a donor is repriced when its
    # receiver took a piece since, and cuts only if still the cheapest. At ε = 0 the rooms add
    # up to the excess exactly: cheapest-first strands late donors with slivers of room no
    # minimum-size piece fits (measured: 1.017 > bound at 512 servers), so donors go one after
    # the other, most overloaded first (the key is the donor's rank).
    cheapest_first = tolerance > 0
    heap: list = [(-math.inf if cheapest_first else k, d, -1, None) for k, d in enumerate(donors)]
    rank = {d: k for k, d in enumerate(donors)}
    version = [0] * num_servers
    deferred = set()  # donors already sent back once for their next piece
    moved_bytes = moved_units = 0.0  # what the pieces so far moved
    while heap:
        score, d, priced, best = heapq.heappop(heap)
        owed = rooms.load[d] - rooms.cap
        if owed <= done:
            continue
        live = _live_segments(queues[d], cutter)
        if not live:
            continue
        if best is None or priced != version[best.server]:
            best, score = _best_piece(live, cutter, rooms, owed)
            if cheapest_first and heap and score > heap[0][0] and d not in deferred:
                deferred.add(d)
                # Rooms and residency changed since this donor was priced: whoever now has the
                # cheapest piece cuts first, so a kv holder's room goes where it saves most.
                heapq.heappush(heap, (score, d, -1 if best is None else version[best.server],
                                      best))
                continue
        if best is None:
            # Nothing fits any room at the minimum shard size: overshoot the roomiest server.
            # Only while the receiver ends below where the donor stands now.
            r = min(range(num_servers), key=rooms.load.__getitem__)
            best = cutter.propose(live[0], r, owed, owed + rooms.room(r), owed)
            if best is None:
                continue
        pieces = [(best, d)]
        # A donor's last piece is often a small remnant sent where none of its kv lives, at
        # several times the plan's bytes per unit so far: try relaying it through a kv holder.
        if best.shed >= owed - done and best.bytes * moved_units > \
                _COSTLY * moved_bytes * min(best.gain, best.shed):
            pieces = _relay(best, d, cutter, rooms, queues, owed) or pieces
        for piece, giver in pieces:
            cutter.apply(piece)
            rooms.move(giver, piece.server, piece.shed, piece.gain)
            version[piece.server] += 1
            moved_bytes += piece.bytes
            moved_units += min(piece.gain, piece.shed)
        deferred.discard(d)
        heapq.heappush(heap, (score if cheapest_first else rank[d], d, -1, None))
    return cutter.columns()


def _live_segments(queue: list[int], cutter: Cutter) -> list[int]:
    """The donor's densest segments with rows left (drops exhausted ones from ``queue``)."""
    while queue and cutter.rows_left(queue[0]) <= 0:
        queue.pop(0)
    return [i for i in queue[:_SEGMENTS_TRIED] if cutter.rows_left(i) > 0]


def _best_piece(live: list[int], cutter: Cutter, rooms: _Rooms, owed: float, skip: int = -1):
    """The piece with the fewest bytes per unit moved among ``live`` segments and the receivers
    worth pricing (but ``skip``); (None, inf) if none fits."""
    best, best_score = None, math.inf
    for i in live:
        for r in rooms.candidates(cutter.resident.holders.get(cutter.doc[i], ())):
            if r == skip:
                continue
            room = rooms.room(r)
            piece = cutter.propose(i, r, min(owed, room), room, owed)
            if piece is not None and piece.per_unit < best_score:
                best, best_score = piece, piece.per_unit
    return best, best_score


def _relay(best, d: int, cutter: Cutter, rooms: _Rooms, queues: dict, owed: float):
    """Relay donor ``d``'s piece ``best`` through a kv holder: [(piece, giver), ...] or None.

    A holder ``v`` of the piece's kv, at most at the cap, takes the donor's rows for little more
    than their q, and sheds as much of its own work to a holder of *that* work's kv with room:
    two pieces at about q cost instead of one that imports kv. Kept only where the two move
    clearly fewer bytes per unit than ``best`` (``_RELAY_GAIN``): they take a second receiver's
    room, which later donors may have needed. Only the ``_RELAYS_TRIED`` holders with the
    cheapest first pieces get their second piece priced, as a document spread over many workers
    has many holders.
    """
    i = best.seg
    holders = cutter.resident.holders.get(cutter.doc[i], ())
    if best.server in holders:
        return None
    firsts = []
    for v in holders:
        if v == d or rooms.load[v] > rooms.cap:
            continue
        live = [j for j in _live_segments(queues[v], cutter) if j != i]
        if not any(r != v and rooms.load[r] < rooms.cap
                   for j in live for r in cutter.resident.holders.get(cutter.doc[j], ())):
            continue
        first = cutter.propose(i, v, best.gain, best.gain, owed)
        if first is not None and rooms.load[v] + first.gain > rooms.cap:
            firsts.append((first.per_unit, v, first, live))
    out, score = None, best.per_unit * _RELAY_GAIN
    for _, v, first, live in sorted(firsts, key=lambda f: f[:2])[:_RELAYS_TRIED]:
        over = rooms.load[v] + first.gain - rooms.cap
        second, _ = _best_piece(live, cutter, rooms, over, skip=v)
        if second is None or second.shed < over:
            continue
        relayed = (first.bytes + second.bytes) / min(first.gain, first.shed)
        if relayed < score:
            out, score = [(first, d), (second, v)], relayed
    return out


_COSTLY = 3.0  # a donor's last piece is relayed only above this times the mean bytes per unit
_RELAY_GAIN = 0.8  # a relay must move at most this share of the direct piece's bytes per unit
_RELAYS_TRIED = 2  # holders whose second piece is priced

_SEGMENTS_TRIED = 3  # a donor's densest segments weighed against each other for every piece
_ROOMIEST_TRIED = 2  # receivers with the most room offered besides the kv holders


class _Rooms:
    """Servers' load against the cap, with a lazy min-heap for the roomiest receivers.

    The cap follows the current mean: with a throughput table a cut makes the donor shed less
    than the receiver gains (thinner tasks run slower), so total predicted time grows as pieces
    are cut and the bound ``max((1+ε)·mean, mean + grain)`` is measured against that total. In
    score pairs the total never changes. A rising cap only gives receivers more room.
    """

    def __init__(self, load: np.ndarray, tolerance: float, grain: float):
        self.tolerance, self.grain = tolerance, grain
        self.reset(load)

    def reset(self, load: np.ndarray) -> None:
        self.load = load.tolist()
        self.total = float(load.sum())
        self._update_cap()
        self.heap = [(self.load[r], r) for r in range(len(self.load))]
        heapq.heapify(self.heap)

    def _update_cap(self) -> None:
        mean = self.total / len(self.load)
        self.cap = max((1 + self.tolerance) * mean, mean + self.grain)

    def room(self, r: int) -> float:
        return self.cap - self.load[r]

    def top(self, k: int) -> list[int]:
        """The ``k`` receivers with the most room left (fewer if fewer have room)."""
        out: list[tuple[float, int]] = []
        while self.heap and len(out) < k:
            load, r = heapq.heappop(self.heap)
            if load == self.load[r] and load < self.cap:
                out.append((load, r))
        for item in out:
            heapq.heappush(self.heap, item)
        return [r for _, r in out]

    def candidates(self, holders) -> list[int]:
        """Receivers worth pricing: kv holders with room, then the roomiest others."""
        picked = [r for r in holders if self.load[r] < self.cap]
        return picked + [r for r in self.top(_ROOMIEST_TRIED) if r not in picked]

    def move(self, donor: int, receiver: int, shed: float, gain: float) -> None:
        """``donor`` sheds ``shed`` and ``receiver`` gains ``gain`` (planning units)."""
        self.load[donor] -= shed
        self.load[receiver] += gain
        if gain != shed:
            self.total += gain - shed
            self._update_cap()
        heapq.heappush(self.heap, (self.load[receiver], receiver))
        heapq.heappush(self.heap, (self.load[donor], donor))  # a rising cap may give it room
