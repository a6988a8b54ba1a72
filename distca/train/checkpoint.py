"""Atomic, sharded, checksummed checkpoints: one safetensors file per rank in a step directory
that only becomes visible when complete.

Layout under ``RUN/checkpoints/``::

    step_00000050/rank_00000.safetensors   # that rank's model + optimizer shard and torch RNG
    step_00000050/rank_00001.safetensors
    step_00000050/meta.json                # step, data position, world size
    step_00000050/manifest.json            # size and sha256 of every other file; written last

A save goes to a hidden ``.tmp-…`` directory: every shard is written to a temporary name,
fsynced and renamed, then ``meta.json``, then ``manifest.json`` likewise, then the directory is
renamed to its final name and the parent fsynced. A crash at any point leaves either the
previous checkpoints only, or a hidden directory that :func:`latest_checkpoint` ignores and
:func:`prune` removes. Nothing is unpickled on load: shards are safetensors, metadata is JSON.

The manifest knows nothing of the shard format (it lists files by relative path), so a later
format keeps the same integrity check: sizes are compared whenever checkpoints are listed,
sha256 digests (:func:`verify`) before any checkpoint is loaded, exported or kept as the last
good one by :func:`prune`. A flipped bit in a same-size file is caught by the digest.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
META = "meta.json"
MANIFEST = "manifest.json"
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


class DamagedCheckpoint(ValueError):
    """A checkpoint file is missing, cut short or does not match its sha256; names the file."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(path: Path) -> dict:
    """``{"file", "size", "sha256"}`` of one file a rank wrote (hashed where it was written,
    on that rank, so the driver never reads every shard back)."""
    return {"file": path.name, "size": path.stat().st_size, "sha256": sha256_of(path)}


def write_shard(directory: Path, rank: int, state: dict[str, torch.Tensor]) -> dict:
    """Write ``state`` (flat name -> tensor) plus this process's RNG state; returns its
    :func:`file_entry` for the manifest."""
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
    return file_entry(final)


def _write_json(directory: Path, name: str, value: dict) -> None:
    tmp = directory / (name + ".partial")
    tmp.write_text(json.dumps(value, indent=1))
    _replace_durably(tmp, directory / name)


def commit(tmp_dir: Path, step: int, meta: dict, shards: list[dict]) -> Path:
    """Make the checkpoint in ``tmp_dir`` visible as ``step_<step>``; returns its path.
    ``shards``: the :func:`file_entry` of every file the ranks wrote."""
    _write_json(tmp_dir, META, dict(meta, step=step, world_size=len(shards)))
    entries = [*shards, file_entry(tmp_dir / META)]
    written = {p.name for p in tmp_dir.iterdir()}
    listed = {e["file"] for e in entries}
    if written != listed:  # a rank wrote a file it did not report, or reported a missing one
        raise DamagedCheckpoint(f"{tmp_dir}: files {sorted(written ^ listed)} are not in "
                                f"the manifest")
    _write_json(tmp_dir, MANIFEST, {"files": {e.pop("file"): e for e in entries}})
    final = tmp_dir.parent / f"{STEP_PREFIX}{step:08d}"
    if final.exists():  # a run restarted before this step re-saves it
        shutil.rmtree(final)
    os.rename(tmp_dir, final)
    _fsync_dir(final.parent)
    return final


def _manifest(step_dir: Path) -> dict[str, dict]:
    """``file -> {size, sha256}``, checked for sizes; raises :class:`DamagedCheckpoint`."""
    try:
        files = json.loads((step_dir / MANIFEST).read_text())["files"]
        for name, entry in files.items():
            path = step_dir / name
            if not path.is_file():
                raise DamagedCheckpoint(f"{path} is missing")
            if path.stat().st_size != entry["size"]:
                raise DamagedCheckpoint(f"{path} has {path.stat().st_size} bytes, the manifest "
                                        f"says {entry['size']}")
    except DamagedCheckpoint:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DamagedCheckpoint(f"{step_dir / MANIFEST} is missing or unreadable ({exc})") from None
    return files


def read_meta(step_dir: Path) -> dict | None:
    """The checkpoint's metadata, or None unless every file of its manifest is present with
    its size (cheap: no digests; :func:`verify` checks those)."""
    try:
        _manifest(step_dir)
        return json.loads((step_dir / META).read_text())
    except (DamagedCheckpoint, OSError, ValueError):
        return None


def verify(step_dir: Path) -> dict:
    """The checkpoint's metadata once every file matches its manifest's size and sha256;
    raises :class:`DamagedCheckpoint` naming the first file that does not."""
    for name, entry in _manifest(step_dir).items():
        if sha256_of(step_dir / name) != entry["sha256"]:
            raise DamagedCheckpoint(f"{step_dir / name} does not match its sha256 in "
                                    f"{step_dir / MANIFEST} (the file changed after it was saved)")
    return json.loads((step_dir / META).read_text())


def _step_dirs(checkpoints: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every visible step directory, oldest first."""
    found = []
    if checkpoints.is_dir():
        for path in checkpoints.iterdir():
            number = path.name[len(STEP_PREFIX):]
            if path.name.startswith(STEP_PREFIX) and number.isdigit():  # not a copy's "step_4 (1)"
                found.append((int(number), path))
    return sorted(found)


def complete_checkpoints(checkpoints: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint whose files have their manifest's sizes, oldest
    first (a commit never leaves another kind: a disk fault or a cut-short copy did)."""
    return [(step, path) for step, path in _step_dirs(checkpoints)
            if read_meta(path) is not None]


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """One warning per damaged checkpoint per process (resume checks, then loads)."""
    if message not in _warned:
        _warned.add(message)
        print(f"distca: warning: {message}", file=sys.stderr)


def latest_checkpoint(checkpoints: Path, warn=_warn_once) -> tuple[Path, dict] | None:
    """The newest checkpoint whose every file matches its manifest (sha256 included), and its
    metadata; every newer damaged one is named through ``warn`` and skipped."""
    skipped = []
    found = None
    for _, path in reversed(_step_dirs(checkpoints)):
        try:
            found = path, verify(path)
            break
        except DamagedCheckpoint as exc:
            skipped.append(f"skipping {path}: {exc}")
    using = f"using {found[0].name}" if found else "no undamaged checkpoint is left"
    for message in skipped:
        warn(f"{message}; {using}")
    return found


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


def check_room(checkpoints: Path, keep: int) -> None:
    """Before a save: refuse (ENOSPC, naming the sizes) when the newest checkpoint's size is
    not free, rather than fail halfway. A save needs room for one checkpoint more than
    ``trainer.keep_checkpoints``: the oldest is pruned only after the new one commits."""
    newest = complete_checkpoints(checkpoints)
    if not newest:
        return
    need = sum(e["size"] for e in _manifest(newest[-1][1]).values())
    free = shutil.disk_usage(checkpoints).free
    if free < need:
        raise OSError(errno.ENOSPC, f"No space left for the next checkpoint: it needs about "
                      f"{need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free (a save needs "
                      f"room for trainer.keep_checkpoints={keep} + 1 checkpoints)",
                      str(checkpoints))


def prune(checkpoints: Path, keep: int, just_saved: Path | None = None) -> None:
    """Keep the newest ``keep`` complete checkpoints, and always the newest one that verifies
    (a damaged newer one must not push the last good one out); remove older ones and
    abandoned saves (a checkpoint with files missing or cut short is left). ``just_saved``: the
    checkpoint this process committed a moment ago, whose digests its ranks computed from the
    files they wrote; it is taken as verified rather than read back whole after every save."""
    if not checkpoints.is_dir():
        return
    for path in checkpoints.iterdir():
        if path.name.startswith(TMP_PREFIX):
            shutil.rmtree(path, ignore_errors=True)
    complete = complete_checkpoints(checkpoints)
    if just_saved is not None and complete and complete[-1][1] == just_saved:
        good = just_saved
    else:
        found = latest_checkpoint(checkpoints, warn=lambda message: None)
        good = found[0] if found else None
    for _, path in complete[:-keep]:
        if path != good:
            shutil.rmtree(path, ignore_errors=True)
