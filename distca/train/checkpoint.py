"""Atomic, checksummed checkpoints: a step directory that only becomes visible when complete.

Layout under ``RUN/checkpoints/``::

    step_00000050/__0_0.distcp     # torch.distributed.checkpoint files: each rank's pieces of
    step_00000050/__1_0.distcp     # the whole-model state (distca.train.sharded_state)
    step_00000050/.metadata        # DCP's index of every tensor's pieces
    step_00000050/meta.json        # step, data position, layout of the run that saved it
    step_00000050/manifest.json    # size and sha256 of every other file; written last

The tensors are stored whole (the pieces are placed by whole-model offsets), so a checkpoint
loads into any layout. A save goes to a hidden ``.tmp-…`` directory: the ranks write their
files there (DCP), each hashes its own, then ``meta.json`` and ``manifest.json`` are written to
temporary names, fsynced and renamed, then the directory is renamed to its final name and the
parent fsynced. A crash at any point leaves either the previous checkpoints only, or a hidden
directory that :func:`latest_checkpoint` ignores and :func:`prune` removes.

The manifest lists files by relative path, whatever wrote them: sizes are compared whenever
checkpoints are listed, sha256 digests (:func:`verify`) before any checkpoint is loaded,
exported or kept as the last good one by :func:`prune`. A flipped bit in a same-size file is
caught by the digest. Checkpoints of distca 0.1 (a ``rank_*.safetensors`` file per
rank, tied to their layout) are refused with what to do (:func:`check_format`).
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

STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
META = "meta.json"
MANIFEST = "manifest.json"
DCP_METADATA = ".metadata"  # written by torch.distributed.checkpoint
LEGACY_SHARD = "rank_00000.safetensors"  # the first shard of the format of distca 0.1


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


def _write_json(directory: Path, name: str, value: dict) -> None:
    tmp = directory / (name + ".partial")
    tmp.write_text(json.dumps(value, indent=1))
    _replace_durably(tmp, directory / name)


def rank_files(directory: Path, rank: int) -> list[dict]:
    """The :func:`file_entry` of every file rank ``rank`` wrote into ``directory`` (DCP names
    them ``__<rank>_<n>.distcp``; rank 0 also writes ``.metadata``)."""
    files = sorted(Path(directory).glob(f"__{rank}_*.distcp"))
    if rank == 0 and (Path(directory) / DCP_METADATA).is_file():
        files.append(Path(directory) / DCP_METADATA)
    return [file_entry(f) for f in files]


def commit(tmp_dir: Path, step: int, meta: dict, shards: list[dict]) -> Path:
    """Make the checkpoint in ``tmp_dir`` visible as ``step_<step>``; returns its path.
    ``shards``: the :func:`file_entry` of every file the ranks wrote."""
    _write_json(tmp_dir, META, dict(meta, step=step))
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


def check_format(step_dir: Path) -> None:
    """Refuse a checkpoint of the format of distca 0.1, naming what to do."""
    if (Path(step_dir) / LEGACY_SHARD).is_file():
        raise DamagedCheckpoint(
            f"{step_dir} is in the checkpoint format of distca 0.1 (a "
            f"rank_*.safetensors file per rank); this version reads checkpoints of "
            f"torch.distributed.checkpoint only. Its weights are still readable: "
            f"`distca export-hf {step_dir} OUT` with distca 0.1, then start a run with "
            f"model.init_from=OUT (the optimizer state starts fresh)")
