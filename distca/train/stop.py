"""Clean stops on SIGTERM and SIGINT, after Megatron's ``--exit-signal-handler``.

The first signal only records itself; the driver checks :attr:`StopSignals.signum` after
every step, saves a checkpoint of that step (unless it just did) and stops with
:class:`~distca.train.errors.Stopped`, which the CLI reports in one line and turns into exit
code 128 + signal. ``ray job stop`` sends SIGTERM, so it stops a job the same way (it waits
``RAY_JOB_STOP_WAIT_TIME_S`` before it kills: allow it the time a checkpoint takes). A
second signal stops at once (``KeyboardInterrupt``), keeping the checkpoints saved so far.

The handlers are installed once Ray is connected: ``ray.init`` installs a C-level handler that
prints a stack trace on SIGTERM and kills the driver, and a handler installed afterwards
replaces it.
"""

from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """A context manager: inside it SIGTERM and SIGINT request a stop after the current step."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # asked twice: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopSignals:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():  # None: a C-level handler (Ray's)
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""
