"""Where one rank's step time went, from the torch profiler's events of that step.

Every profiled event is put in one category, by name, from the outside in:

* ``attention``: this rank's attention kernels as a server, forward and backward (the spans
  ``distca.serve``/``distca.serve_bwd`` of :mod:`distca.parallel.spans`, recorded while the
  step runs under :func:`~distca.parallel.spans.recording`);
* ``linear``: megatron's linear layers (``Linear…`` forward and backward nodes);
* ``comm``: collectives (``c10d::``/``gloo:``/``nccl:`` ops), the span ``distca.comm_wait``
  (where a rank blocks on an attention exchange, forward and backward), and the rest of any
  event that wraps collectives without attention: exposed communication;
* ``other``: the remaining compute (norms, rope, embeddings, loss, optimizer, packing).

``idle`` is the step's wall time outside every event: waiting on a synchronous collective
(the gradient all-reduce waits for the slowest rank) and Python between operators.
"""

from __future__ import annotations

CATEGORIES = ("linear", "attention", "comm", "other", "idle")
_COMM_PREFIXES = ("c10d::", "gloo:", "nccl:", "distca.comm_wait")
_ATTENTION_SPANS = ("distca.serve", "distca.serve_bwd")


def own_category(name: str) -> str | None:
    """The category an event has by its name alone, or None for containers."""
    if name in _ATTENTION_SPANS:
        return "attention"
    if name.startswith(_COMM_PREFIXES):
        return "comm"
    if "Linear" in name:
        return "linear"
    return None


def _split(event, out: dict[str, float], spans: list | None, origin: float) -> set[str]:
    """Add the event's seconds to ``out`` by category; returns the categories under it."""
    start, end = event.time_range.start, event.time_range.end
    cat = own_category(event.name)
    if cat is not None:
        out[cat] += (end - start) / 1e6
        if spans is not None:
            spans.append(((start - origin) / 1e6, (end - origin) / 1e6, cat))
        return {cat}
    inner: list = [] if spans is not None else None
    found: set[str] = set()
    covered = 0.0
    for child in event.cpu_children:
        found |= _split(child, out, inner, origin)
        covered += child.time_range.elapsed_us()
    fallback = "comm" if "comm" in found and "attention" not in found else "other"
    out[fallback] += max(0.0, event.time_range.elapsed_us() - covered) / 1e6
    if spans is not None:  # the container first, so its children are drawn over it
        spans.append(((start - origin) / 1e6, (end - origin) / 1e6, fallback))
        spans.extend(inner)
    return found | {fallback}


def step_breakdown(step_event, with_spans: bool = False) -> dict:
    """Seconds per category of the ``step_event`` (a profiler FunctionEvent that wraps one
    training step) and, if asked, ``spans``: [(start_s, end_s, category)] from the step start,
    containers before the events inside them."""
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    spans: list | None = [] if with_spans else None
    origin = step_event.time_range.start
    for child in step_event.cpu_children:
        _split(child, seconds, spans, origin)
    wall = step_event.time_range.elapsed_us() / 1e6
    seconds["idle"] = max(0.0, wall - sum(seconds[c] for c in CATEGORIES if c != "idle"))
    result = {"wall_s": wall, "seconds": seconds}
    if with_spans:
        result["spans"] = spans
    return result


def find_step_event(events, name: str):
    """The outermost profiler event called ``name`` (the record_function around the step)."""
    matches = [e for e in events if e.name == name]
    if not matches:
        raise RuntimeError(f"the profiler recorded no {name!r} event")
    return max(matches, key=lambda e: e.time_range.elapsed_us())
