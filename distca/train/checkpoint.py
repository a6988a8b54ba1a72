"""Atomic, sharded checkpoints: one safetensors file per rank in a step directory that only
becomes visible when complete.

Layout under ``RUN/checkpoints/``::

    step_00000050/rank_00000.safetensors   # that rank's model + optimizer shard and torch RNG
    step_00000050/rank_00001.safetensors
    step_00000050/meta.json                # step, data position, shard sizes; written last

A save goes to a hidden ``.tmp-…`` directory: every shard is written to a temporary name,
fsynced and renamed, then ``meta.json`` likewise, then the directory is renamed to its final
name and the parent fsynced. A crash at any point leaves either the previous checkpoints only,
or a hidden directory that :func:`latest_checkpoint` ignores and :func:`prune` removes.
Nothing is unpickled on load: shards are safetensors, metadata is JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
META = "meta.json"
RNG_KEY = "distca.rng.torch_cpu"  # reserved key in every shard: the rank's CPU RNG state


def shard_name(rank: int) -> str:
    return f"rank_{rank:05d}.safetensors"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_durably(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def begin_save(checkpoints: Path, step: int) -> Path:
    """A fresh hidden directory that this step's shards are written into."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    tmp = checkpoints / f"{TMP_PREFIX}{STEP_PREFIX}{step:08d}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def write_shard(directory: Path, rank: int, state: dict[str, torch.Tensor]) -> int:
    """Write ``state`` (flat name -> tensor) plus this process's RNG state; returns its size."""
    import torch
    from safetensors.torch import save_file

    if RNG_KEY in state:
        raise ValueError(f"{RNG_KEY} is reserved for the RNG state")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    tensors[RNG_KEY] = torch.get_rng_state()
    final = Path(directory) / shard_name(rank)
    tmp = final.with_suffix(".partial")
    save_file(tensors, str(tmp))
    _replace_durably(tmp, final)
    return final.stat().st_size


def commit(tmp_dir: Path, step: int, meta: dict, shard_sizes: list[int]) -> Path:
    """Make the checkpoint in ``tmp_dir`` visible as ``step_<step>``; returns its path."""
    meta = dict(meta, step=step, world_size=len(shard_sizes), shard_sizes=shard_sizes)
    tmp_meta = tmp_dir / (META + ".partial")
    tmp_meta.write_text(json.dumps(meta, indent=1))
    _replace_durably(tmp_meta, tmp_dir / META)
    final = tmp_dir.parent / f"{STEP_PREFIX}{step:08d}"
    if final.exists():  # a run restarted before this step re-saves it
        shutil.rmtree(final)
    os.rename(tmp_dir, final)
    _fsync_dir(final.parent)
    return final


def read_meta(step_dir: Path) -> dict | None:
    """The checkpoint's metadata, or None unless every shard it lists is present and whole."""
    try:
        meta = json.loads((step_dir / META).read_text())
        sizes = meta["shard_sizes"]
        for rank, size in enumerate(sizes):
            if (step_dir / shard_name(rank)).stat().st_size != size:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta


def _step_dirs(checkpoints: Path, complete: bool) -> list[tuple[int, Path]]:
    found = []
    if checkpoints.is_dir():
        for path in checkpoints.iterdir():
            if path.name.startswith(STEP_PREFIX) and (read_meta(path) is not None) == complete:
                found.append((int(path.name[len(STEP_PREFIX):]), path))
    return sorted(found)


def complete_checkpoints(checkpoints: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint, oldest first."""
    return _step_dirs(checkpoints, complete=True)


def damaged_checkpoints(checkpoints: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of visible step directories whose shards do not match their
    ``meta.json`` (a commit never leaves one: a disk fault or a cut-short copy did)."""
    return _step_dirs(checkpoints, complete=False)


def latest_checkpoint(checkpoints: Path) -> tuple[Path, dict] | None:
    found = complete_checkpoints(checkpoints)
    if not found:
        return None
    path = found[-1][1]
    return path, read_meta(path)


def read_shard(step_dir: Path, rank: int) -> dict[str, torch.Tensor]:
    """Load one rank's shard and restore its RNG state; returns the rest of the tensors."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(step_dir) / shard_name(rank)
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"checkpoint shard {path} is unreadable ({exc}); move "
                         f"{path.parent} aside to resume from the checkpoint before it") from None
    torch.set_rng_state(state.pop(RNG_KEY))
    return state


def prune(checkpoints: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; remove older ones and abandoned saves."""
    if not checkpoints.is_dir():
        return
    for path in checkpoints.iterdir():
        if path.name.startswith(TMP_PREFIX):
            shutil.rmtree(path, ignore_errors=True)
    for _, path in complete_checkpoints(checkpoints)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
