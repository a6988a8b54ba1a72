"""The training driver: data -> step on every rank -> metrics -> checkpoint, with restarts.

``train(cfg, recipe)`` runs in the process that ``distca train`` starts (locally, or as a
``ray job submit`` entrypoint). It builds the micro-batches of each step once, puts them in
Ray's object store and has every rank run the step. When a rank's process dies it stops the
group, starts a fresh one from the last complete checkpoint and goes on, at most
``trainer.max_restarts`` times.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from distca.config import DistcaConfig, OnNan
from distca.data import Dataset
from distca.train.checkpoint import begin_save, check_room, commit, latest_checkpoint, prune
from distca.train.errors import RunFileError, Stopped, TrainingStopped, WorkerDied
from distca.train.metrics import MetricsLog
from distca.train.run_dir import RunDir
from distca.train.step_log import StepLog
from distca.train.watchdog import step_setting, step_timeout


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    resumed_at: int  # the step this invocation started from (0, or a resumed checkpoint's)
    restarts: int
    first_loss: float
    last_loss: float
    last_checkpoint: Path | None


class _RollBack(Exception):
    """A NaN/inf loss with ``trainer.on_nan=rollback`` (handled inside the attempt)."""


class Trainer:
    def __init__(self, cfg: DistcaConfig, run_dir: RunDir, data: Dataset,
                 eval_data: Dataset | None = None, stop=None):
        self.cfg = cfg
        self.run = run_dir
        self.data = data
        self.eval_data = eval_data
        self.stop = stop  # a StopSignals: SIGTERM/SIGINT stop after the step, checkpointed
        self.saved: tuple[int, Path] | None = None  # (step, path) of this process's last save
        self.resumed_at: int | None = None
        self.peak_flops = math.nan
        self.wandb = None  # the W&B sink with logging.wandb=true, open while running
        self.restarts = 0
        self.slowest_step: float | None = None  # seconds, for the watchdog's default timeout
        self.warm = False  # has the current group finished a step (warmed up)?
        self.data_offset = 0  # batches skipped by rollbacks: step s reads position s + offset
        self.first_loss = math.nan
        self.last_loss = math.nan

    # ---- one attempt: a fresh group from the last checkpoint (or from scratch) -------------
    def _attempt(self, resume: bool, progress) -> int:
        from distca.train.group import WorkerGroup

        t = self.cfg.trainer
        group = WorkerGroup(self.cfg)
        self.warm = False
        try:
            progress.stage(f"starting {group.world_size} ranks and building the model "
                           f"({self.cfg.model.num_layers} layers, hidden "
                           f"{self.cfg.model.hidden_size})")
            self.run.write_workers(group.start())
            progress.stage("measuring each rank's matmul FLOP/s (the peak for MFU)")
            self.peak_flops = sum(group.call("peak_flops"))
            start = 0
            found = latest_checkpoint(self.run.checkpoints) if resume else None
            if found is not None:
                path, meta = found
                progress.stage(f"loading checkpoint {path}")
                start = meta["step"]
                group.call("load", str(path), start)
                self.restarts = max(self.restarts, meta.get("restarts", 0))
                self.data_offset = meta.get("data_offset", 0)
            elif self.cfg.model.init_from:
                progress.stage(f"loading {self.cfg.model.init_from} (model.init_from)")
                group.call("init_from")
            metrics = MetricsLog(self.run.metrics, self.run.tensorboard, start, self.wandb)
            try:
                if self.resumed_at is None:
                    self.resumed_at = start
                progress.at(start)
                step = start
                while step < t.steps:
                    step += 1
                    try:
                        self._step(group, step, metrics, progress)
                    except _RollBack:
                        step = self._roll_back(group, step, metrics, progress)
                    if step < t.steps:  # asked during the last step: the run is done
                        self._stop_if_asked(group, step)
            finally:
                metrics.close()
            return t.steps
        finally:
            group.shutdown()

    def _step(self, group, step: int, metrics: MetricsLog, progress) -> None:
        import ray

        from distca.profile.flops import achieved, model_flops

        t = self.cfg.trainer
        step_batches = self.data.step_batches(step + self.data_offset)
        batches = ray.put(step_batches)
        wall = time.perf_counter()
        ranks = group.call("train_step", batches, **self._step_deadline())
        wall = time.perf_counter() - wall
        if self.warm:  # a warm-up step would inflate the default timeout tenfold
            self.slowest_step = max(self.slowest_step or 0.0, wall)
        self.warm = True
        stats = {**ranks[0], "memory_mb": max(r["memory_mb"] for r in ranks)}
        loss = stats["loss"]
        finite = math.isfinite(loss)
        row = {"step": step, **stats, "wall_s": wall,
               "tokens_per_s": stats["tokens"] / max(wall, 1e-9),
               **achieved(model_flops(self.cfg, step_batches), wall, self.peak_flops),
               "restarts": self.restarts, "skipped_rows": self.data.skipped_rows}
        if self.eval_data is not None and (step % t.eval_interval == 0 or step == t.steps):
            row["eval_loss"] = self._evaluate(group)
        logged = step % t.log_interval == 0 or step == t.steps or not finite \
            or "eval_loss" in row
        if logged:
            metrics.log(row)
        if not finite or stats.get("skipped", 0.0):
            if t.on_nan is OnNan.stop:
                last = latest_checkpoint(self.run.checkpoints)
                where = f"the last checkpoint {last[0]} stays valid" if last else "no checkpoint"
                raise TrainingStopped(f"step {step}: loss is {loss}; stopping because "
                                      f"trainer.on_nan=stop ({where})")
            if t.on_nan is OnNan.rollback:
                raise _RollBack()
            progress.warn(f"step {step}: loss is {loss}; update skipped (trainer.on_nan=skip)")
        else:
            if math.isnan(self.first_loss):
                self.first_loss = loss
            self.last_loss = loss
        progress.step(row, logged)
        if step % t.checkpoint_interval == 0 or step == t.steps:
            self._save(group, step)

    def _roll_back(self, group, bad_step: int, metrics: MetricsLog, progress) -> int:
        """Reload the last checkpoint and continue after the offending batch; returns the
        checkpoint's step. Rollbacks count as restarts (bounded by trainer.max_restarts)."""
        t = self.cfg.trainer
        found = latest_checkpoint(self.run.checkpoints)
        if found is None or self.restarts >= t.max_restarts:
            why = ("there is no checkpoint to roll back to" if found is None else
                   f"giving up after {self.restarts} restarts (trainer.max_restarts)")
            raise TrainingStopped(f"step {bad_step}: loss is not finite and {why} "
                                  f"(trainer.on_nan=rollback)")
        path, meta = found
        back = meta["step"]
        group.call("load", str(path), back)
        self.data_offset += bad_step - back
        self.restarts += 1
        metrics.rewind(back)
        progress.warn(f"step {bad_step}: loss is not finite; rolled back to {path.name} and "
                      f"skipped {bad_step - back} batches (trainer.on_nan=rollback)")
        progress.at(back)
        return back

    def _step_deadline(self) -> dict:
        """``group.call``'s timeout for a step: ``trainer.step_timeout_s`` or sized from the
        slowest step so far (a group's first step warms up)."""
        configured = self.cfg.trainer.step_timeout_s
        return {"timeout": step_timeout(configured, self.slowest_step if self.warm else None),
                "setting": step_setting(configured)}

    def _evaluate(self, group) -> float:
        """Validation loss: the mean over the eval data's first ``trainer.eval_batches`` steps'
        batches (the same batches every time, so evaluations compare), no update."""
        import ray

        # a forward over a step's worth of batches: a step's deadline
        losses = [group.call("eval_loss", ray.put(self.eval_data.step_batches(s)),
                             **self._step_deadline())[0]
                  for s in range(1, self.cfg.trainer.eval_batches + 1)]
        return sum(losses) / len(losses)

    def _stop_if_asked(self, group, step: int) -> None:
        """After a step: on SIGTERM/SIGINT save it (unless just saved) and stop."""
        if self.stop is None or self.stop.signum is None:
            return
        if self.saved is None or self.saved[0] != step:
            self._save(group, step)
        raise Stopped(self.stop.name, self.stop.signum, step, self.saved[1])

    def _save(self, group, step: int) -> None:
        try:
            check_room(self.run.checkpoints, self.cfg.trainer.keep_checkpoints)
        except OSError as exc:
            raise RunFileError(self.run.checkpoints / f"step {step}", exc) from None
        tmp = begin_save(self.run.checkpoints, step)
        files = [entry for rank in group.call("save", str(tmp)) for entry in rank]
        meta = {"restarts": self.restarts, "seed": self.cfg.trainer.seed,
                "data_position": step + self.data_offset, "data_offset": self.data_offset}
        self.saved = (step, commit(tmp, step, meta, files))
        prune(self.run.checkpoints, self.cfg.trainer.keep_checkpoints, self.saved[1])

    # ---- the whole run ---------------------------------------------------------------------
    def run_to_end(self) -> TrainResult:
        t = self.cfg.trainer
        resume = t.resume
        progress = StepLog(t.steps)
        if self.cfg.logging.wandb:
            from distca.train.wandb_sink import WandbSink

            self.wandb = WandbSink(self.cfg, self.run.path)
        try:
            while True:
                try:
                    self._attempt(resume, progress)
                    break
                except WorkerDied as exc:
                    if self.stop is not None and self.stop.signum is not None:
                        raise TrainingStopped(f"{exc} while stopping on {self.stop.name}; the "
                                              f"checkpoints so far are in "
                                              f"{self.run.checkpoints}") from exc
                    if self.restarts >= t.max_restarts:
                        raise TrainingStopped(f"{exc}; giving up after {self.restarts} restarts "
                                              f"(trainer.max_restarts={t.max_restarts})") from exc
                    self.restarts += 1
                    resume = True
                    progress.warn(f"{exc}; restart {self.restarts}/{t.max_restarts} "
                                  f"from the last checkpoint")
        finally:
            progress.close()
            if self.wandb is not None:
                self.wandb.close()
        last = latest_checkpoint(self.run.checkpoints)
        return TrainResult(self.run.path, t.steps, self.resumed_at or 0, self.restarts,
                           self.first_loss,
                           self.last_loss, last[0] if last else None)
