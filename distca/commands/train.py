"""``distca train RECIPE [key=value ...]``: validate, start or join Ray, train, summarise.

Bad input (recipe, data files, tokenizer, run directory) fails with exit code 2 before any Ray
process starts. Failures while training (a NaN loss with ``trainer.on_nan=stop``, a rank's
error, more deaths than ``trainer.max_restarts``, an unreachable cluster) exit 1 with one
message; the local Ray cluster is always shut down.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from distca.cli import UsageError
from distca.config import DistcaConfig, load_config


def _run_dir(cfg: DistcaConfig, recipe: str) -> Path:
    from distca.train.checkpoint import complete_checkpoints
    from distca.train.run_dir import default_run_dir

    t = cfg.trainer
    if t.run_dir is None:
        if t.resume:
            raise UsageError(f"{recipe}: trainer.resume: resuming needs trainer.run_dir=<the run>")
        return default_run_dir(recipe)
    path = Path(t.run_dir)
    has_checkpoints = bool(complete_checkpoints(path / "checkpoints"))
    if t.resume and not has_checkpoints:
        raise UsageError(f"{recipe}: trainer.resume: {path} holds no complete checkpoint")
    if not t.resume and has_checkpoints:
        raise UsageError(f"{recipe}: trainer.run_dir: {path} already holds checkpoints; "
                         f"pass trainer.resume=true to continue it or choose a new run_dir")
    return path


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.recipe, args.overrides)
    path = _run_dir(cfg, args.recipe)
    from distca.data import make_dataset
    from distca.train.errors import ClusterError, TrainingStopped, WorkerDied, WorkerError
    from distca.train.ray_cluster import connect, disconnect, resolve_address
    from distca.train.run_dir import RunDir
    from distca.train.worker import world_layout

    try:
        data = make_dataset(cfg)  # a missing data file or tokenizer fails before Ray starts
    except (OSError, ValueError) as exc:
        raise UsageError(f"{args.recipe}: {exc}") from None
    run_dir = RunDir(path)
    run_dir.write_config(cfg)
    world = len(world_layout(cfg))
    signal.signal(signal.SIGTERM, _interrupt)  # stop like Ctrl-C: shut the local cluster down
    try:
        connect(resolve_address(cfg.ray.address), world * cfg.ray.num_cpus_per_worker,
                world * cfg.ray.num_gpus_per_worker)
        from distca.train.driver import Trainer

        result = Trainer(cfg, run_dir, data).run_to_end()
    except (TrainingStopped, WorkerError, WorkerDied, ClusterError) as exc:
        print(f"distca: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"distca: interrupted; checkpoints so far are in {run_dir.checkpoints}",
              file=sys.stderr)
        return 130
    finally:
        disconnect()
    print(f"trained {result.steps} steps: loss {result.first_loss:.4f} -> "
          f"{result.last_loss:.4f}, restarts {result.restarts}")
    print(f"  run directory: {result.run_dir}")
    print(f"  metrics:       {result.run_dir / 'metrics.jsonl'} (TensorBoard: "
          f"{result.run_dir / 'tensorboard'})")
    print(f"  checkpoint:    {result.last_checkpoint}")
    return 0
