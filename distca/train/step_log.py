"""What a training run tells the person watching it: a tqdm bar on a terminal, and one plain
``logging`` line per logged step everywhere else (a file, ``ray job submit``, Slurm).

A bar written to a file is one endless line joined by carriage returns, so the bar is drawn only
when both stdout and stderr are terminals. The stages that take a while before the first step
(starting Ray, starting the ranks and building the model, loading a checkpoint) are announced
in both modes, so a run is never silent without saying why.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("distca")


def configure_logging() -> None:
    """INFO lines on stdout (where ``> log`` sends them), warnings and errors on stderr, both
    timestamped; once per process."""
    if not log.handlers:
        form = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
        info = logging.StreamHandler(sys.stdout)
        info.addFilter(lambda record: record.levelno < logging.WARNING)
        problems = logging.StreamHandler(sys.stderr)
        problems.setLevel(logging.WARNING)
        for handler in (info, problems):
            handler.setFormatter(form)
            log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False  # Ray and others configure the root logger their own way


def on_terminal() -> bool:
    return sys.stdout.isatty() and sys.stderr.isatty()


def step_line(row: dict, total: int) -> str:
    """One step as a line: step/total, loss, lr, tokens/s, MFU and TFLOP/s, step time, memory."""
    parts = [f"step {row['step']}/{total}", f"loss {row['loss']:.4f}"]
    if "lr" in row:
        parts.append(f"lr {row['lr']:.3g}")
    parts.append(f"tok/s {row['tokens_per_s']:.0f}")
    if "mfu" in row:
        parts.append(f"MFU {100 * row['mfu']:.2f}% ({row['tflops']:.3g} TFLOP/s)")
    parts.append(f"step {row['wall_s']:.2f}s")
    if "memory_mb" in row:
        parts.append(f"mem {row['memory_mb']:.0f} MiB")
    if "eval_loss" in row:
        parts.append(f"eval loss {row['eval_loss']:.4f}")
    return "  ".join(parts)


class StepLog:
    """Progress of one run of ``total`` steps; :meth:`close` when the run ends."""

    def __init__(self, total: int, bar: bool | None = None):
        self.total = total
        self._bar = None
        if on_terminal() if bar is None else bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc="train", unit="step", file=sys.stderr,
                             dynamic_ncols=True, mininterval=1.0)

    def stage(self, message: str) -> None:
        """A stretch of work before (or between) steps: said as it starts."""
        if self._bar is not None:
            self._bar.set_description_str(message, refresh=True)
        else:
            log.info(message)

    def warn(self, message: str) -> None:
        """Something the user should see (a skipped update, a restart), on stderr."""
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            log.warning(message)

    def at(self, step: int) -> None:
        """The run is (again) at ``step``: starting, resuming or rolled back."""
        if self._bar is not None:
            self._bar.set_description_str("train")
            self._bar.reset(total=self.total)
            self._bar.update(step)

    def step(self, row: dict, logged: bool) -> None:
        """A finished step; ``logged`` steps (``trainer.log_interval``) get a line."""
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}",
                                  imb=f"{row['imbalance_before']:.2f}->{row['imbalance']:.2f}",
                                  refresh=False)
            self._bar.update(1)
            if "eval_loss" in row:
                self._bar.write(step_line(row, self.total))
        elif logged:
            log.info(step_line(row, self.total))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
