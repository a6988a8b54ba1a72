"""Pieces the balancing planner cuts off segments, priced in bytes against the kv a server holds.

A *piece* is the tail band of a segment's remaining rows, ``a`` query rows ``[x-a, x)``, with the
kv columns ``[c, e)`` next to the diagonal (``e = x`` for a causal turn, the turn's end for a
context turn). The same rows' far-left columns ``[kv_start, c)`` stay on the home worker as a
full task (a kv split), so every piece and every kept task together still tile the mask once.

A piece costs ``a·q_bytes`` (q in, out and lse back) plus ``kv_bytes`` for each of its kv tokens
the receiver does not already hold. :class:`Residency` tracks what each server holds per
document: its own tokens, the kv prefix its colocated tasks import (documents that span workers),
and the kv of pieces it has received. A receiver next to a spanning document's home, or one that
already took a piece of that document, therefore gets kv nearly for free, and a band with the
whole kv prefix (``c = kv_start``) is often the cheapest piece there. Elsewhere the cheapest
piece of ``r`` pairs is about ``sqrt(r·kv_bytes/q_bytes)`` rows high; :meth:`Cutter.propose`
prices a few heights around both and keeps the fewest bytes per unit of cost moved.

With a throughput table pieces are whole-kv bands only (see :meth:`Cutter.propose`), and a piece
may add more predicted seconds to its receiver than it removes from the donor.

Every cut leaves pieces of at least ``min_shard_tokens`` rows and kv columns (or the whole range).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from distca.scheduler.cost import CostTable, ModelShape
from distca.scheduler.documents import Segments


class Residency:
    """kv tokens each server already holds, per document, as disjoint sorted intervals."""

    def __init__(self, seg: Segments):
        self.spans: dict[tuple[int, int], list[tuple[int, int]]] = {}
        self.holders: dict[int, list[int]] = defaultdict(list)
        # Every home task reads kv from its document's start, so what a worker holds of a
        # document is one prefix; only documents on two or more workers can be reused elsewhere.
        order = np.lexsort((seg.home, seg.doc))
        doc, home = seg.doc[order], seg.home[order]
        first = np.ones(doc.size, dtype=bool)
        first[1:] = (doc[1:] != doc[:-1]) | (home[1:] != home[:-1])
        starts = np.flatnonzero(first)
        group_doc, group_home = doc[starts], home[starts]
        group_end = np.maximum.reduceat(seg.kv_end[order], starts) if starts.size else starts
        shared = np.zeros(group_doc.size, dtype=bool)
        shared[1:] = group_doc[1:] == group_doc[:-1]
        shared[:-1] |= shared[1:]
        for d, h, lo, hi in zip(group_doc[shared].tolist(), group_home[shared].tolist(),
                                seg.kv_start[order][starts][shared].tolist(),
                                group_end[shared].tolist()):
            self.spans[(h, d)] = [(lo, hi)]
            self.holders[d].append(h)

    def missing(self, server: int, doc: int, lo: int, hi: int) -> int:
        """How many tokens of ``[lo, hi)`` of ``doc`` ``server`` lacks."""
        held = 0
        for a, b in self.spans.get((server, doc), ()):
            held += max(0, min(b, hi) - max(a, lo))
        return hi - lo - held

    def drop(self, server: int, doc: int) -> None:
        """``server`` no longer runs anything of ``doc``: it imports none of its kv."""
        if self.spans.pop((server, doc), None) is not None:
            self.holders[doc].remove(server)

    def trim(self, server: int, doc: int, lo: int) -> None:
        """``server`` no longer reads ``doc``'s kv before ``lo`` (it lent those columns out)."""
        if (server, doc) in self.spans:
            self.spans[(server, doc)] = [(max(a, lo), b) for a, b in self.spans[(server, doc)]
                                         if b > lo]

    def add(self, server: int, doc: int, lo: int, hi: int) -> None:
        key = (server, doc)
        spans = self.spans.get(key)
        if spans is None:
            self.spans[key] = [(lo, hi)]
            self.holders[doc].append(server)
            return
        merged = []
        for a, b in spans:
            if b < lo or a > hi:
                merged.append((a, b))
            else:
                lo, hi = min(a, lo), max(b, hi)
        merged.append((lo, hi))
        merged.sort()
        self.spans[key] = merged


@dataclass(frozen=True)
class Piece:
    """Rows ``[x - rows, x)`` of segment ``seg`` with kv ``[kv_lo, e)`` go to ``server``.

    A *head* piece instead takes the first remaining rows ``[s, s + rows)`` with the whole kv
    prefix ``[kv_start, s + rows)`` (causal turns only).

    ``gain``: the receiver's added cost; ``shed``: the donor's removed cost (equal in score
    pairs; they differ with a throughput table because the kept tasks change shape); ``bytes``:
    what the piece adds to the dispatch given what the receiver already holds.
    """

    seg: int
    server: int
    rows: int
    kv_lo: int
    gain: float
    shed: float
    bytes: int
    head: bool = False

    @property
    def per_unit(self) -> float:
        """Bytes per unit of cost moved: what pieces are ranked by (fewest first)."""
        return self.bytes / min(self.gain, self.shed)


class Cutter:
    """Cuts pieces off segments; keeps the segments' remaining rows and the tasks."""

    def __init__(self, seg: Segments, min_shard: int, model: ModelShape,
                 cost_table: CostTable | None):
        self.seg = seg
        self.m = min_shard
        self.q_bytes, self.kv_bytes = model.q_bytes, model.kv_bytes
        self.table = cost_table
        # Rows [row_start, row_end) of each segment stay home. Python lists: the planner reads
        # single entries in its loop, where numpy scalars are slow.
        self.row_start, self.row_end = seg.q_start.tolist(), seg.q_end.tolist()
        self.kv_start = seg.kv_start.tolist()
        self.kv_end, self.causal = seg.kv_end.tolist(), seg.causal.tolist()
        self.doc, self.home = seg.doc.tolist(), seg.home.tolist()
        self.resident = Residency(seg)
        self.tasks: list[tuple[int, int, int, int, int, int, bool]] = []

    def units(self, rows: int, cols: int, causal: bool) -> float:
        """Planning cost of a task: score pairs, or seconds with a throughput table."""
        if rows <= 0 or cols <= 0:
            return 0.0
        pairs = rows * cols - (rows * (rows - 1) // 2 if causal else 0)
        if self.table is None:
            return float(pairs)
        return float(self.table.seconds(rows, cols, pairs))

    def home_units(self, i: int, row_end: int, row_start: int | None = None) -> float:
        """Cost of segment ``i``'s home task when rows ``[row_start, row_end)`` stay home."""
        causal = self.causal[i]
        e = row_end if causal else self.kv_end[i]
        start = self.row_start[i] if row_start is None else row_start
        return self.units(row_end - start, e - self.kv_start[i], causal)

    def rows_left(self, i: int) -> int:
        return self.row_end[i] - self.row_start[i]

    def propose(self, i: int, server: int, lo: float, hi: float, owed: float) -> Piece | None:
        """The cheapest piece (bytes per unit moved) of segment ``i`` for ``server``.

        Aims at a cost in ``[lo, hi]`` (never above ``hi``). ``owed`` is what the donor still
        has to shed: the columns a kv split keeps home are lost to later pieces, so a split may
        only waste the segment's spare capacity beyond ``owed``. None if no valid piece fits.
        """
        x, qs, ds = self.row_end[i], self.row_start[i], self.kv_start[i]
        rows = x - qs
        if rows <= 0:
            return None
        causal = self.causal[i]
        e = x if causal else self.kv_end[i]
        full_kv = e - ds
        capacity = rows * full_kv - (rows * (rows - 1) // 2 if causal else 0)
        table = self.table
        if table is None:
            # The smallest valid piece already overflows: no height fits (head pieces cost more).
            a = self.m if self.m < rows else rows
            k = max(a if causal else 1, self.m if self.m < full_kv else full_kv)
            if a * k - (a * (a - 1) // 2 if causal else 0) > hi:
                return None
            rate = 1.0
        else:  # aim in score pairs at a shard's throughput
            rate = float(table.throughput(min(rows, self.m), full_kv))
        heights = self._heights(rows, full_kv, causal, lo * rate, hi * rate,
                                capacity - min(owed * rate, capacity))
        if table is not None:  # taller pieces run faster: offer a ladder of heights
            ladder = self.m
            while ladder < rows:
                ladder *= 4
                heights.append(min(ladder, rows))
        doc = self.doc[i]
        before = self.home_units(i, x)
        slack = capacity - min(owed, capacity)
        best, best_score = None, math.inf
        for a in heights:
            if table is None:
                k = self._columns_for(a, full_kv, causal, lo, hi, slack)
                if k is None:
                    continue
                # In score pairs the donor sheds exactly what the receiver gains.
                gain = shed = float(a * k - (a * (a - 1) // 2 if causal else 0))
                if gain > hi or gain <= 0:
                    continue
            else:
                # A kv split keeps the band's far-left columns home as a thin task that runs
                # slower than the rows it came from, often shedding nothing: whole bands only.
                k = full_kv
                gain = self.units(a, k, causal)
                if gain > hi:
                    continue
                shed = before - self.home_units(i, x - a)
                if shed <= 0:
                    continue
            moved = a * self.q_bytes + self.resident.missing(server, doc, e - k, e) * self.kv_bytes
            score = moved / min(gain, shed)
            if score < best_score:
                best, best_score = Piece(i, server, a, e - k, gain, shed, moved), score
        if causal and qs > ds and (server, doc) in self.resident.spans:  # pays only on holders
            head = self._head_piece(i, server, lo * rate, hi, before)
            if head is not None and head.per_unit < best_score:
                best = head
        return best

    def _head_piece(self, i: int, server: int, target: float, hi: float,
                    before: float) -> Piece | None:
        """The first remaining rows of a causal segment with their whole kv prefix.

        A server that holds the document's kv up to these rows (the previous worker, for a
        document that spans workers) needs only the rows' own q and kv, where a tail band would
        need the kv between its prefix and the band. Aims at ``target`` pairs, at most ``hi``.
        """
        s, x, ds = self.row_start[i], self.row_end[i], self.kv_start[i]
        rows, m, p = x - s, self.m, s - ds
        b = p + 0.5  # a rows after a prefix of p cost a·p + a(a+1)/2 pairs
        a = math.ceil(math.sqrt(b * b + 2 * max(target, 1.0)) - b)
        a = max(min(a, rows), min(m, rows))
        if rows - a < m:
            a = rows
        gain = self.units(a, p + a, True)
        while gain > hi and a > m and rows - (a - 1) >= m:
            a = max(m, min(a - 1, math.floor(a * hi / gain)))
            gain = self.units(a, p + a, True)
        if gain > hi:
            return None
        shed = before - self.home_units(i, x, s + a)
        if shed <= 0:
            return None
        moved = a * self.q_bytes + self.resident.missing(server, self.doc[i], ds, s + a) \
            * self.kv_bytes
        return Piece(i, server, a, ds, gain, shed, moved, head=True)

    def apply(self, piece: Piece) -> None:
        i = piece.seg
        x = self.row_end[i]
        causal = self.causal[i]
        e = x if causal else self.kv_end[i]
        doc, a = self.doc[i], piece.rows
        if piece.head:
            s = self.row_start[i]
            self.tasks.append((piece.server, doc, s, s + a, piece.kv_lo, s + a, True))
            self.row_start[i] = s + a
            self.resident.add(piece.server, doc, piece.kv_lo, s + a)
            return
        self.tasks.append((piece.server, doc, x - a, x, piece.kv_lo, e, causal))
        if piece.kv_lo > self.kv_start[i]:
            self.tasks.append((self.home[i], doc, x - a, x, self.kv_start[i], piece.kv_lo, False))
        self.row_end[i] = x - a
        self.resident.add(piece.server, doc, piece.kv_lo, e)

    def lend(self, i: int, server: int, kv_end: int) -> None:
        """Segment ``i``'s rows against its kv columns ``[kv_start, kv_end)`` run on ``server``
        as one full task; the home keeps the rows against ``[kv_end, e)`` and stops importing
        the lent columns. Before any piece is cut (the segment's rows are all home)."""
        self.tasks.append((server, self.doc[i], self.row_start[i], self.row_end[i],
                           self.kv_start[i], kv_end, False))
        self.kv_start[i] = kv_end
        self.resident.trim(self.home[i], self.doc[i], kv_end)

    def rehome(self, i: int, server: int) -> None:
        """Move all of segment ``i``'s rows to ``server``; its home stops importing the kv."""
        x, ds = self.row_end[i], self.kv_start[i]
        self.apply(Piece(i, server, x - self.row_start[i], ds, 0.0, 0.0, 0))
        self.resident.drop(self.home[i], self.doc[i])

    def _heights(self, rows: int, full_kv: int, causal: bool, lo: float, hi: float,
                 slack: float) -> list[int]:
        """Candidate row counts: the whole-prefix band, and around the sqrt-optimal height.

        Every height is valid: at least ``min_shard`` rows (or all of them), and never leaving
        fewer than ``min_shard`` rows behind.
        """
        m = self.m
        least = m if m < rows else rows
        lo = lo if lo > 1.0 else 1.0
        band = _rows_for(lo, full_kv, causal)
        if hi < math.inf:
            band = min(band, max(_rows_for(hi, full_kv, causal, up=False), 1))
        widest = max(_rows_for(lo + slack, full_kv, causal, up=False), band)
        best = math.sqrt(lo * self.kv_bytes / self.q_bytes)
        out = set()
        for a in (band, round(best * 0.25), round(best * 0.5), round(best), round(best * 2.0),
                  round(best * 4.0)):
            a = band if a < band else widest if a > widest else a
            a = least if a < least else rows if a > rows else a
            out.add(rows if rows - a < m else a)
        return sorted(out)

    def _columns_for(self, a: int, full_kv: int, causal: bool, lo: float, hi: float,
                     slack: float) -> int | None:
        """kv columns ``k`` for a piece of ``a`` rows: cost reaches ``lo`` if it can, <= ``hi``.

        A piece of ``a`` rows keeps ``a·(full_kv - k)`` pairs at home; that may not exceed slack.
        """
        m = self.m
        tri = a * (a - 1) // 2 if causal else 0
        k_min = max(a if causal else 1, m if m < full_kv else full_kv)
        k = max(math.ceil((lo + tri) / a), k_min)
        if k >= full_kv or full_kv - k < m or a * (full_kv - k) > slack:
            k = full_kv
        if a * k - tri <= hi:
            return k
        k = min(math.floor((hi + tri) / a), full_kv - m)
        if k >= k_min and a * (full_kv - k) <= slack:
            return k
        return None

    def columns(self):
        """All tasks as columns for ``make_tasks``: moved pieces, kept columns, kept rows."""
        s = self.seg
        row_start = np.array(self.row_start, dtype=np.int64)
        row_end = np.array(self.row_end, dtype=np.int64)
        kv_start = np.array(self.kv_start, dtype=np.int64)  # lent columns left the home
        kept_kv_end = np.where(s.causal, row_end, s.kv_end)
        moved = np.array(self.tasks, dtype=np.int64).reshape(-1, 7)
        return tuple(np.concatenate([a, b]) for a, b in zip(
            (s.home, s.doc, row_start, row_end, kv_start, kept_kv_end, s.causal),
            (moved[:, 0], moved[:, 1], moved[:, 2], moved[:, 3], moved[:, 4], moved[:, 5],
             moved[:, 6].astype(bool))))


def _rows_for(target: float, full_kv: int, causal: bool, up: bool = True) -> int:
    """Rows of a whole tail band whose cost first reaches (or last stays under) target.

    A band of ``a`` rows costs ``a·F - a(a-1)/2`` pairs (causal; ``a·F`` full), F = full_kv; the
    float root is corrected by exact integer steps.
    """
    f = full_kv
    if causal:
        b = f + 0.5
        disc = b * b - 2 * target
        real = b - math.sqrt(disc) if disc > 0 else b
        t = 1
    else:
        real = target / f
        t = 0
    if up:
        a = max(1, math.ceil(real))
        while a > 1 and (a - 1) * f - t * (a - 1) * (a - 2) / 2 >= target:
            a -= 1
        while a * f - t * a * (a - 1) / 2 < target and a < f:
            a += 1
    else:
        a = max(1, math.floor(real))
        while a > 0 and a * f - t * a * (a - 1) / 2 > target:
            a -= 1
        while a + 1 <= f and (a + 1) * f - t * (a + 1) * a / 2 <= target:
            a += 1
    return a
