"""Why a run stopped. Kept free of Ray imports: the CLI catches these before Ray is loaded."""


class ClusterError(RuntimeError):
    """Ray could not be started or reached; the message says which address and why."""


class WorkerDied(RuntimeError):
    """A rank's process died (killed, out of memory, node lost): restartable."""


class WorkerError(RuntimeError):
    """A rank raised an exception or could not start: not restartable; carries the error."""


class TrainingStopped(RuntimeError):
    """The run cannot go on (NaN loss with on_nan=stop, too many restarts)."""
