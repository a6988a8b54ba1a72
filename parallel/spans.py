"""Named spans: where a rank's step spends its time, without clocks threaded through signatures.

Code marks an interval with ``with span("comm_wait"):``. Every span is a
``torch.profiler.record_function`` range (so it shows in a profiler trace under
``distca.<name>``) and, while a :class:`SpanRecorder` is active (:func:`recording`), its wall
seconds — and CPU seconds of the calling thread, for spans opened with ``cpu=True`` — are added
to the recorder's totals. Outside :func:`recording` a span costs one profiler range check.

The names the runtime uses:

* ``comm_wait``: blocked on an attention exchange (forward and backward): exposed communication;
* ``serve`` / ``serve_bwd``: this rank's attention kernels as a server, forward / backward
  (their CPU seconds, both passes, under ``serve_cpu``);
* ``attend``: a worker's whole attention call (exchange, waiting, serving, merge), forward.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch.profiler import record_function


@dataclass
class SpanRecorder:
    """Seconds per span name, summed over every span closed while the recorder was active."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds


_active: list[SpanRecorder] = []  # the innermost recording() context's recorder, if any


@contextlib.contextmanager
def recording() -> Iterator[SpanRecorder]:
    """Collect the spans closed inside this context (on this process) into a new recorder."""
    recorder = SpanRecorder()
    _active.append(recorder)
    try:
        yield recorder
    finally:
        _active.remove(recorder)


def is_recording() -> bool:
    """Whether a :func:`recording` context is active (callers may skip costly clock setup)."""
    return bool(_active)


@contextlib.contextmanager
def span(name: str, cpu: bool = False) -> Iterator[None]:
    """Mark an interval as ``name``; with ``cpu``, also add its thread CPU seconds to
    ``serve_cpu`` (the kernel spans: their CPU time shows how busy serving kept the core)."""
    with record_function(f"distca.{name}"):
        if not _active:
            yield
            return
        start, cpu0 = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            recorder = _active[-1]
            recorder.add(name, time.perf_counter() - start)
            if cpu:
                recorder.add("serve_cpu", time.thread_time() - cpu0)
