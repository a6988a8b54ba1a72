"""Why a run stopped. Kept free of Ray imports: the CLI catches these before Ray is loaded."""


class ClusterError(RuntimeError):
    """Ray could not be started or reached; the message says which address and why."""


class WorkerDied(RuntimeError):
    """A rank's process died (killed, out of memory, node lost): restartable."""


class WorkerError(RuntimeError):
    """A rank raised an exception or could not start: not restartable; carries the error."""


class TrainingStopped(RuntimeError):
    """The run cannot go on (NaN loss with on_nan=stop, too many restarts)."""


class Stopped(RuntimeError):
    """The run was asked to stop (SIGTERM, SIGINT) and saved a checkpoint of its last step."""

    def __init__(self, signal_name: str, signum: int, step: int, checkpoint):
        self.signum = signum
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint: {checkpoint} "
                         f"(continue with trainer.resume=true "
                         f"trainer.run_dir={checkpoint.parent.parent})")


class RunFileError(TrainingStopped):
    """A file of the run directory could not be written (a full disk, a quota)."""

    def __init__(self, path, exc: OSError):
        import shutil

        try:
            usage = shutil.disk_usage(path.parent)
            free = f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**30:.1f} GiB there"
        except OSError:
            free = "free space unknown"
        super().__init__(f"cannot write {path}: {exc.strerror or exc} ({free}); the last "
                         f"complete checkpoint is intact: free space, then resume with "
                         f"trainer.resume=true")
