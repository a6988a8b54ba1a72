"""Checkpoint IO, metrics log and run directory (no Ray): atomicity, pruning, restore."""

import json

import pytest
import torch

from distca.config import load_config
from distca.train.checkpoint import (
    DamagedCheckpoint,
    begin_save,
    check_format,
    commit,
    complete_checkpoints,
    latest_checkpoint,
    prune,
    rank_files,
)
from distca.train.errors import TrainingStopped
from distca.train.metrics import MetricsLog, read_metrics
from distca.train.run_dir import RunDir
from distca.train.sharded_state import read_whole, write_whole

DATA = "__0_0.distcp"  # the file of rank 0's tensors (torch.distributed.checkpoint)


def state(seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g),
            "b": torch.randn(3, generator=g).to(torch.bfloat16)}


def save(root, step, commit_it=True):
    tmp = begin_save(root, step)
    write_whole(tmp, state(step))
    return commit(tmp, step, {"data_position": step}, rank_files(tmp, 0)) if commit_it else tmp


def test_round_trip_is_exact(tmp_path):
    path = save(tmp_path, 5)
    loaded = read_whole(path)
    assert loaded.keys() == state(5).keys()
    for key, value in state(5).items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value)
    found, meta = latest_checkpoint(tmp_path)
    assert found == path and meta["step"] == 5 and meta["data_position"] == 5


def test_interrupted_saves_never_load_as_valid(tmp_path):
    save(tmp_path, 2)
    save(tmp_path, 4, commit_it=False)  # crashed before commit: hidden directory only
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [2]
    # a data file cut short after meta.json was written, or a missing one, invalidates it
    bad = save(tmp_path, 6)
    with open(bad / DATA, "r+b") as f:
        f.truncate(100)
    gone = save(tmp_path, 8)
    (gone / ".metadata").unlink()
    no_meta = save(tmp_path, 10)
    (no_meta / "meta.json").unlink()
    warnings = []
    assert latest_checkpoint(tmp_path, warnings.append)[0].name == "step_00000002"
    assert [w.split(":")[0] for w in warnings] == [f"skipping {p}" for p in (no_meta, gone, bad)]
    # a re-save of a step after a restart replaces the old directory
    save(tmp_path, 2)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [2]


def test_checkpoint_of_the_old_format_is_refused_with_what_to_do(tmp_path):
    old = tmp_path / "step_00000004"
    old.mkdir()
    (old / "rank_00000.safetensors").write_bytes(b"")
    with pytest.raises(DamagedCheckpoint, match="distca 0.1.*export-hf.*model.init_from"):
        check_format(old)
    check_format(save(tmp_path, 2))


def flip_a_byte(step_dir):
    """Flip one byte in the middle of rank 0's data file (same size: sizes cannot tell)."""
    path = step_dir / DATA
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    path.write_bytes(bytes(raw))
    return path


def test_flipped_exponent_bit_is_detected_and_the_previous_checkpoint_used(tmp_path):
    save(tmp_path, 2)
    newest = save(tmp_path, 4)
    shard = flip_a_byte(newest)
    warnings = []
    found, meta = latest_checkpoint(tmp_path, warnings.append)
    assert found.name == "step_00000002" and meta["step"] == 2
    assert len(warnings) == 1 and str(shard) in warnings[0] and "sha256" in warnings[0]
    prune(tmp_path, keep=1)  # the damaged newer one must not push the good one out
    assert found.exists()
    newest = save(tmp_path, 6)
    prune(tmp_path, keep=1, just_saved=newest)  # trusted without reading it back
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [6]


def test_manifest_covers_every_file_and_catches_a_damaged_meta(tmp_path):
    path = save(tmp_path, 3)
    manifest = json.loads((path / "manifest.json").read_text())["files"]
    assert sorted(manifest) == [".metadata", DATA, "meta.json"]
    meta = path / "meta.json"
    meta.write_text(meta.read_text().replace('"step": 3', '"step": 9'))  # same length
    assert latest_checkpoint(tmp_path, lambda m: None) is None
    tmp = begin_save(tmp_path, 5)
    write_whole(tmp, state(1))  # files no rank reported
    with pytest.raises(ValueError, match="not in the manifest"):
        commit(tmp, 5, {}, [])


def test_prune_keeps_newest_and_removes_abandoned(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step)
    tmp = save(tmp_path, 5, commit_it=False)
    prune(tmp_path, keep=2)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [3, 4]
    assert not tmp.exists()


def test_metrics_log_drops_repeated_steps_on_restart(tmp_path):
    run = RunDir(tmp_path / "run")
    log = MetricsLog(run.metrics, run.tensorboard, start=0)
    for step in range(1, 6):
        log.log({"step": step, "loss": 1.0 / step, "restarts": 0})
    log.log({"step": 6, "loss": float("nan"), "restarts": 0})
    log.close()
    assert read_metrics(run.metrics)[-1]["loss"] is None  # NaN stays valid JSON
    log = MetricsLog(run.metrics, run.tensorboard, start=3)  # restarted from step 3
    log.log({"step": 4, "loss": 0.3, "restarts": 1})
    log.close()
    rows = read_metrics(run.metrics)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["restarts"] == 1
    assert any(p.name.startswith("events.out.tfevents") for p in run.tensorboard.iterdir())


def test_torn_last_metrics_line_is_dropped_on_resume(tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    rows = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3))
    run.metrics.write_text(rows + '{"step": 4, "lo')  # a write cut short by a full disk
    log = MetricsLog(run.metrics, run.tensorboard, start=3)
    log.log({"step": 4, "loss": 0.5})
    log.close()
    assert [r["step"] for r in read_metrics(run.metrics)] == [1, 2, 3, 4]
    assert f"{run.metrics}:4: dropping a torn last line" in capsys.readouterr().err
    run.metrics.write_text(rows.replace('"step": 2', '"step": 2,,') + rows)
    with pytest.raises(ValueError, match=f"{run.metrics}:2: not a JSON metrics row"):
        read_metrics(run.metrics)


def test_full_disk_while_logging_metrics_is_one_clear_error(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    log = MetricsLog(run.metrics, run.tensorboard, start=0)
    log._file.close()
    monkeypatch.setattr(log, "_file", open("/dev/full", "a"))  # every write: ENOSPC
    with pytest.raises(TrainingStopped) as caught:
        log.log({"step": 1, "loss": 1.0})
    message = str(caught.value)
    assert f"cannot write {run.metrics}: No space left on device" in message
    assert "MiB free" in message and "\n" not in message
    with pytest.raises(TrainingStopped, match="No space left"):
        log.close()  # the buffered row fails again; the files are closed all the same
    log = MetricsLog(run.metrics, run.tensorboard, start=1)

    def full(*args, **kwargs):  # what TensorBoard's writer thread re-raises on a full disk
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(log._tb, "add_scalar", full)
    with pytest.raises(TrainingStopped, match=f"cannot write {run.tensorboard}: No space left"):
        log.log({"step": 2, "loss": 1.0})
    log.close()


def test_run_dir_files(tmp_path):
    run = RunDir(tmp_path / "r")
    run.write_config(load_config("recipes/tiny.yaml", ["trainer.steps=7"]))
    assert load_config(run.path / "config.yaml").trainer.steps == 7
    run.write_workers([{"rank": 0, "role": "worker", "node": "127.0.0.1", "pid": 1}])
    assert json.loads(run.workers.read_text())[0]["role"] == "worker"


def test_a_save_that_cannot_fit_is_refused_before_it_starts(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from distca.train.checkpoint import check_room

    check_room(tmp_path, keep=2)  # nothing saved yet: no estimate, no refusal
    save(tmp_path, 1)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 10, 10))
    with pytest.raises(OSError, match="keep_checkpoints=2 \\+ 1 checkpoints"):
        check_room(tmp_path, keep=2)


def test_rank_failures_name_the_rank_its_pid_and_a_full_disk_in_one_line():
    from ray.exceptions import ActorDiedError, RayTaskError

    from distca.train.errors import WorkerDied
    from distca.train.group import WorkerGroup

    group = WorkerGroup(load_config("recipes/tiny.yaml"))
    group.workers = [{"rank": r, "pid": 100 + r, "node": "10.0.0.9"} for r in range(2)]
    with pytest.raises(WorkerDied, match=r"^rank 1 \(pid 101 on 10.0.0.9\) died during train_step"):
        group._raise_failure(ActorDiedError(), 1, [], {}, "train_step")
    full = OSError(28, "No space left on device", "/runs/r/checkpoints/.tmp/rank_00001.partial")
    with pytest.raises(TrainingStopped) as caught:
        group._raise_failure(RayTaskError("save", "Traceback ...", full), 1, [], {}, "save")
    assert str(caught.value).startswith("cannot write /runs/r/checkpoints/.tmp/rank_00001.partial: "
                                        "No space left on device")
    assert "Traceback" not in str(caught.value)


def test_unreadable_data_file_is_one_error_naming_the_checkpoint(tmp_path):
    """DCP's own failure is a BaseException (it would kill a Ray worker): it comes back as a
    DamagedCheckpoint naming the directory and the rank's error."""
    path = save(tmp_path, 2)
    (path / DATA).write_bytes((path / DATA).read_bytes()[:-40])
    with pytest.raises(DamagedCheckpoint, match=f"cannot read checkpoint {path} \\(rank 0: "):
        read_whole(path)
