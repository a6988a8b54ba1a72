"""Sparing a spanning document's short segment the import of its kv prefix.

A segment on worker ``h`` whose document started on earlier workers reads the document's kv
prefix ``[kv_start, q_start)``, which ``h`` imports whole even for a few rows; the earlier workers
of the document already hold it. Before the planner balances, two moves cut that import:

* *lend*: an earlier worker that holds ``[kv_start, c)`` (its own tokens and the prefix it reads
  itself) runs the segment's rows against those columns as one full task. It costs ``rows·q_bytes``
  and spares ``h`` ``(c - kv_start)·kv_bytes``; the home keeps its rows against ``[c, e)``. Only
  into a holder's room (the holder stays under the cap): the lent task never moves again.
* *rehome*: the previous worker runs the segment's rows whole, importing their own kv too
  (``rows·(q_bytes + kv_bytes)``). It may push the previous worker over the cap, which its own
  segments then shed.

A lend saves more bytes and moves fewer pairs than a rehome, so a segment is rehomed only when no
holder has room for a lend.
"""

from __future__ import annotations

import math

import numpy as np
from distca.scheduler.cutting import Cutter
from distca.scheduler.documents import Segments


def spare_prefix_imports(cutter: Cutter, load: np.ndarray, cap: float, weight: np.ndarray,
                         lend: bool) -> None:
    """Lend (when ``lend``) or rehome spanning segments, most bytes saved first.

    ``load`` (S,), the servers' planning cost, follows the moves; ``weight`` (N,) is read only:
    the home tasks' cost before any move (each segment moves at most once). Segments must be
    whole (no piece cut yet).
    """
    seg = cutter.seg
    prefix = seg.q_start - seg.kv_start
    rows = seg.q_end - seg.q_start
    lent_saving = prefix * cutter.kv_bytes - rows * cutter.q_bytes  # the whole prefix lent
    moved_saving = lent_saving - rows * cutter.kv_bytes  # a rehome moves the rows' own kv too
    rehomable = seg.causal & (prefix > 0) & (moved_saving > 0) & (seg.home > 0)
    if lend:
        picked = np.flatnonzero(_alone(seg) & (rehomable | (prefix >= cutter.m)
                                                & (lent_saving > 0)))
        order = np.argsort(-lent_saving[picked], kind="stable")
    else:
        picked = np.flatnonzero(_alone(seg) & rehomable)
        order = np.argsort(-moved_saving[picked], kind="stable")
    for i in picked[order].tolist():
        if lend and _lend(i, cutter, load, cap, weight):
            continue
        if rehomable[i]:
            _rehome(i, int(moved_saving[i]), cutter, load, cap, weight)


def _alone(seg: Segments) -> np.ndarray:
    """(N,) bool: the segment is its home worker's only segment of its document (so the home
    reads the prefix for this segment alone)."""
    key = seg.home * (seg.doc.max(initial=0) + 1) + seg.doc
    group = np.unique(key, return_inverse=True)[1]
    return np.bincount(group)[group] == 1


def _lend(i: int, cutter: Cutter, load: np.ndarray, cap: float, weight: np.ndarray) -> bool:
    """Lend segment ``i``'s prefix to the earlier worker that saves most and has room."""
    h, doc, ds = cutter.home[i], cutter.doc[i], cutter.kv_start[i]
    q_start = cutter.row_start[i]
    rows, e = cutter.row_end[i] - q_start, cutter.kv_end[i]
    best = None  # (bytes saved, holder, end of the lent columns, the holder's gain)
    j = i - 1
    while j >= 0 and cutter.doc[j] == doc:  # the document's earlier segments
        v, c = cutter.home[j], min(cutter.kv_end[j], q_start)
        saved = (c - ds) * cutter.kv_bytes - rows * cutter.q_bytes
        # A holder that lent its own prefix no longer holds the document from its start.
        if v != h and cutter.kv_start[j] == ds and c - ds >= cutter.m and saved > 0 \
                and (best is None or saved > best[0]):
            gain = cutter.units(rows, c - ds, False)
            if load[v] + gain <= cap:
                best = (saved, v, c, gain)
        j -= 1
    if best is None:
        return False
    _, v, c, gain = best
    kept = cutter.units(rows, e - c, cutter.causal[i])
    cutter.lend(i, v, c)
    load[v] += gain
    load[h] -= weight[i] - kept
    return True


def _rehome(i: int, saving: int, cutter: Cutter, load: np.ndarray, cap: float,
            weight: np.ndarray) -> None:
    """Run segment ``i`` whole on the previous worker where that is worth it.

    Worth it where the excess above the cap grows by less than the saving would pay for (one
    fresh piece of that size costs about ``2·sqrt(excess·q_bytes·kv_bytes)``), and never above
    the most loaded server.
    """
    h, w = cutter.home[i], float(weight[i])
    excess = max(0.0, load[h - 1] + w - cap) - max(0.0, load[h - 1] - cap) \
        + max(0.0, load[h] - w - cap) - max(0.0, load[h] - cap)
    worth = excess <= 0 or saving > 2 * math.sqrt(excess * cutter.q_bytes * cutter.kv_bytes)
    if worth and load[h - 1] + w <= load.max():
        cutter.rehome(i, h - 1)
        load[h - 1] += w
        load[h] -= w
