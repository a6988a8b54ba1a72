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

from distca.config import DistcaConfig, load_config, to_yaml
from distca.config_choices import CHAT_KINDS
from distca.errors import UsageError

# What a checkpoint's tensors are shaped by: a resumed run must keep these. The layout
# (parallel.*, cad.*, the micro-batch split) may change: checkpoints store whole tensors. Not
# focusft.*: fast weights are in no checkpoint, so FocuSFT may start from an SFT checkpoint.
RESUME_FIXED = tuple(f"model.{k}" for k in ("num_layers", "hidden_size", "num_attention_heads",
                                            "num_kv_heads", "ffn_hidden_size", "vocab_size",
                                            "tie_embeddings", "qkv_bias", "gated_attention",
                                            "learnable_sinks"))


def _keep_batches(cfg: DistcaConfig, recipe: str, before, saved: Path) -> None:
    """A run resumed in another layout reads the batches the uninterrupted run would have:
    the packs of the saved run (``data.pack_tokens``, by default its dp * tokens_per_rank) are
    kept when they fit this layout's micro-batches; otherwise it stops, naming the key."""
    from omegaconf import OmegaConf

    def pack(c) -> int:
        tokens = OmegaConf.select(c, "data.tokens_per_rank")
        return (OmegaConf.select(c, "data.pack_tokens")
                or OmegaConf.select(c, "parallel.dp") * tokens)

    d = cfg.data
    old, capacity = pack(before), cfg.parallel.dp * d.tokens_per_rank
    if d.pack_tokens is None and old != capacity and capacity % old == 0:
        d.pack_tokens = old
        print(f"distca: data.pack_tokens={old}: the packs of the run in {saved.parent} (its "
              f"micro-batches), so that this layout reads the same batches", file=sys.stderr)
    new = d.pack_tokens or capacity
    if new != old:
        raise UsageError(f"{recipe}: data.pack_tokens: the run in {saved.parent} packed its "
                         f"documents {old} tokens at a time, this run would pack {new}, so "
                         f"its steps would read other batches; set data.pack_tokens={old} with "
                         f"a micro-batch (parallel.dp * data.tokens_per_rank) that it divides")
    before_batch = (OmegaConf.select(before, "data.micro_batches")
                    * OmegaConf.select(before, "parallel.dp")
                    * OmegaConf.select(before, "data.tokens_per_rank"))
    if before_batch != capacity * d.micro_batches:
        print(f"distca: note: the global batch changes from {before_batch} to "
              f"{capacity * d.micro_batches} tokens: the steps from here read other data than "
              f"the run in {saved.parent} would have", file=sys.stderr)


def _check_resumable(cfg: DistcaConfig, recipe: str, path: Path, step: int) -> None:
    """Steps left to train, and the shapes the run's checkpoints were saved with (its
    ``config.yaml``, written only once these checks pass)."""
    from omegaconf import OmegaConf

    if step >= cfg.trainer.steps:
        raise UsageError(f"{recipe}: trainer.steps: the run in {path} is already at step "
                         f"{step}; set trainer.steps above {step} to train further")
    saved = path / "config.yaml"
    if not saved.is_file():
        return
    before = OmegaConf.load(saved)
    now = OmegaConf.create(to_yaml(cfg))  # as config.yaml was written: enums by name
    for key in RESUME_FIXED:
        old, new = OmegaConf.select(before, key), OmegaConf.select(now, key)
        if old is not None and old != new:
            raise UsageError(f"{recipe}: {key}: {new} differs from {old} in {saved}; a resumed "
                             f"run keeps the model shape of its checkpoints")
    _keep_batches(cfg, recipe, before, saved)


def _run_dir(cfg: DistcaConfig, recipe: str) -> Path | None:
    """The run directory given by ``trainer.run_dir``, checked; None for a new default one."""
    from distca.train.checkpoint import DamagedCheckpoint, check_format, latest_checkpoint

    t = cfg.trainer
    if t.run_dir is None:
        if t.resume:
            raise UsageError(f"{recipe}: trainer.resume: resuming needs trainer.run_dir=<the run>")
        return None
    path = Path(t.run_dir)
    found = latest_checkpoint(path / "checkpoints")
    if t.resume and found is None:
        raise UsageError(f"{recipe}: trainer.resume: {path} holds no complete checkpoint")
    if not t.resume and found is not None:
        raise UsageError(f"{recipe}: trainer.run_dir: {path} already holds checkpoints; "
                         f"pass trainer.resume=true to continue it or choose a new run_dir")
    if t.resume:
        try:
            check_format(found[0])
        except DamagedCheckpoint as exc:
            raise UsageError(f"{recipe}: trainer.resume: {exc}") from None
        _check_resumable(cfg, recipe, path, found[1]["step"])
    return path


def _check_source(cfg: DistcaConfig, recipe: str, path: Path | None) -> None:
    """``model.init_from``: a checkpoint source must be complete and undamaged, and the run
    must not write into the source's own run directory."""
    from distca.hf.io import resolve_checkpoint
    from distca.model_source import HFFormatError, checkpoint_run

    source = cfg.model.init_from
    run = checkpoint_run(Path(source)) if source else None
    if run is None:
        return
    try:
        resolve_checkpoint(source)
    except HFFormatError as exc:
        raise UsageError(f"{recipe}: model.init_from: {exc}") from None
    if path is not None and path.resolve() == run.resolve():
        raise UsageError(f"{recipe}: trainer.run_dir: {path} is model.init_from's own run; "
                         f"a run started from it writes a run directory of its own")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.recipe, args.overrides)
    from distca.memory.fit import check_fits

    check_fits(cfg, args.recipe)  # a recipe predicted not to fit its device stops here
    path = _run_dir(cfg, args.recipe)
    _check_source(cfg, args.recipe, path)
    from distca.train import preflight
    from distca.train.errors import ClusterError, Stopped, TrainingStopped, WorkerDied, WorkerError
    from distca.train.ray_cluster import connect, disconnect, resolve_address
    from distca.train.run_dir import RunDir, default_run_dir
    from distca.train.step_log import configure_logging, log
    from distca.train.wandb_sink import require_wandb
    from distca.train.worker import world_layout

    configure_logging()
    address = resolve_address(cfg.ray.address)
    if address is None:  # a joined cluster is checked once connected
        preflight.check_local(cfg, args.recipe)
    from distca.data import make_dataset

    try:
        require_wandb(cfg, args.recipe)
        # a missing data file or tokenizer fails before Ray starts
        data = make_dataset(cfg)
        eval_data = make_dataset(cfg, eval_data=True) if cfg.data.eval_paths else None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{args.recipe}: {exc}") from None
    try:
        run_dir = RunDir(path or default_run_dir(args.recipe))
        run_dir.write_config(cfg)
    except (OSError, TrainingStopped) as exc:
        raise UsageError(f"{args.recipe}: trainer.run_dir: cannot write there ({exc})") from None
    if cfg.data.kind in CHAT_KINDS:  # say which mask the run trains with (also in config.yaml)
        log.info(f"chat data with the {cfg.attention.mask.value} attention mask "
                 f"(attention.mask)")
    world = len(world_layout(cfg))
    from distca.train.stop import StopSignals

    # until the run starts, SIGTERM stops like Ctrl-C: whatever of Ray started is shut down
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        log.info(f"run directory {run_dir.path}; "
                 + (f"connecting to Ray at {address}" if address else
                    "starting a local Ray cluster on 127.0.0.1"))
        if not connect(address, world * cfg.ray.num_cpus_per_worker):
            import ray

            preflight.check_cluster(cfg, args.recipe, ray.cluster_resources())
        from distca.train.driver import Trainer

        with StopSignals() as stop:  # after connect: replaces Ray's crash-trace handler
            result = Trainer(cfg, run_dir, data, eval_data, stop).run_to_end()
    except Stopped as exc:
        print(f"distca: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except (TrainingStopped, WorkerError, WorkerDied, ClusterError) as exc:
        print(f"distca: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"distca: interrupted; checkpoints so far are in {run_dir.checkpoints}",
              file=sys.stderr)
        return 130
    finally:
        disconnect()
    resumed = result.resumed_at
    print(f"trained {result.steps - resumed} steps"
          + (f" (steps {resumed + 1}-{result.steps}, resumed at step {resumed})" if resumed else "")
          + f": loss {result.first_loss:.4f} -> {result.last_loss:.4f}, "
          f"restarts {result.restarts}")
    print(f"  run directory: {result.run_dir}")
    print(f"  metrics:       {result.run_dir / 'metrics.jsonl'} (TensorBoard: "
          f"{result.run_dir / 'tensorboard'})")
    print(f"  checkpoint:    {result.last_checkpoint}")
    return 0
