"""``distca train`` end to end: bad input, a short run's directory, loopback-only sockets.

The run and restart tests start a local Ray cluster (marker ``ray``); the long ones are
``slow``. One short run is shared by the default tests of this module.
"""

import json
import math
import os
import re
import signal
import subprocess
import time

import pytest
import torch
from train_helpers import REPO, SocketWatch, descendants, distca_cmd, metrics, run_distca

from distca.cli import main
from distca.config import load_config
from distca.train.checkpoint import begin_save, commit, rank_files
from distca.train.run_dir import RunDir, default_run_dir
from distca.train.sharded_state import read_whole, write_whole

FIELDS = {"step", "loss", "tokens", "tokens_per_s", "step_time_s", "imbalance_before",
          "imbalance", "restarts", "lr", "grad_norm", "skipped", "skipped_rows", "mfu", "tflops",
          "memory_mb", "wall_s"}
# one plain line per step when stdout is a file (no tqdm bar, no carriage returns)
STEP_LINE = re.compile(r"^\d\d:\d\d:\d\d step (\d+)/(\d+)  loss \d+\.\d{4}  lr \S+  tok/s \d+  "
                       r"MFU \d+\.\d\d% \(\S+ TFLOP/s\)  step \d+\.\d\ds  mem \d+ MiB$")


# ---- bad input: exit 2 before anything starts ---------------------------------------------
def test_broken_recipe_fails_before_ray(tmp_path):
    start = time.monotonic()
    out = run_distca("train", "recipes/tiny.yaml", "trainer.stepz=3",
                     f"trainer.run_dir={tmp_path}/r")
    assert out.returncode == 2 and "trainer.stepz" in out.stderr and out.stdout == ""
    assert time.monotonic() - start < 20 and not (tmp_path / "r").exists()


@pytest.mark.parametrize("override, named", [
    ("data.paths=[/nonexistent/corpus.jsonl]", "/nonexistent/corpus.jsonl"),
    ("data.tokenizer=/nonexistent/tok", "/nonexistent/tok"),
])
def test_missing_data_or_tokenizer_names_the_path(tmp_path, override, named):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "hello"}) + "\n")
    args = ["data.kind=text", f"data.paths=[{corpus}]", override]
    out = run_distca("train", "recipes/tiny.yaml", *args, f"trainer.run_dir={tmp_path}/r")
    assert out.returncode == 2 and named in out.stderr and out.stdout == ""


def test_resume_needs_a_run_with_checkpoints(tmp_path):
    out = run_distca("train", "recipes/tiny.yaml", "trainer.resume=true")
    assert out.returncode == 2 and "trainer.run_dir" in out.stderr
    out = run_distca("train", "recipes/tiny.yaml", "trainer.resume=true",
                     f"trainer.run_dir={tmp_path}")
    assert out.returncode == 2 and "no complete checkpoint" in out.stderr


def _finished_run(path):
    """A run directory as a 6-step tiny.yaml run leaves it (a one-tensor checkpoint)."""
    run = RunDir(path)
    run.write_config(load_config("recipes/tiny.yaml", ["trainer.steps=6"]))
    _save_one_tensor(run, 6)
    return run


def _save_one_tensor(run: RunDir, step: int):
    tmp = begin_save(run.checkpoints, step)
    write_whole(tmp, {"w": torch.zeros(1)})
    return commit(tmp, step, {}, rank_files(tmp, 0))


@pytest.mark.parametrize("overrides, named", [
    (["trainer.steps=6"], "already at step 6"),  # nothing left: it reported "loss nan -> nan"
    (["trainer.steps=4"], "already at step 6"),
    (["trainer.steps=9", "model.num_layers=2"], "model.num_layers: 2 differs from 4"),
    # another layout is fine, unless its micro-batches cannot hold the saved run's packs
    (["trainer.steps=9", "parallel.dp=1"], "data.pack_tokens: the run in"),
])
def test_resume_checks_steps_and_shapes_before_ray(tmp_path, capsys, overrides, named):
    run = _finished_run(tmp_path / "run")
    config = (run.path / "config.yaml").read_text()
    rc = main(["train", "recipes/tiny.yaml", "trainer.resume=true",
               f"trainer.run_dir={run.path}", *overrides])
    assert rc == 2 and named in capsys.readouterr().err
    assert (run.path / "config.yaml").read_text() == config  # the run's record is kept


def test_resume_may_turn_focusft_on(tmp_path):
    """Fast weights are in no checkpoint, so FocuSFT may continue an SFT (or imported) run."""
    from distca.commands.train import _check_resumable

    run = _finished_run(tmp_path / "run")
    cfg = load_config("recipes/tiny.yaml", ["trainer.steps=9", "focusft.enabled=true",
                                            "focusft.rank=4", "focusft.layer_fraction=0.5",
                                            "focusft.targets=[down_proj]"])
    _check_resumable(cfg, "recipes/tiny.yaml", run.path, 6)  # no UsageError


def test_resume_in_another_layout_keeps_the_saved_runs_packs(tmp_path, capsys):
    """dp=2 x 1024 tokens saved; dp=4 resumes reading packs of 2048 (the same batches)."""
    from distca.commands.train import _check_resumable

    run = _finished_run(tmp_path / "run")
    cfg = load_config("recipes/tiny.yaml", ["trainer.steps=9", "parallel.dp=4",
                                            "data.micro_batches=1", "parallel.tp=1"])
    _check_resumable(cfg, "recipes/tiny.yaml", run.path, 6)
    assert cfg.data.pack_tokens == 2048
    err = capsys.readouterr().err
    assert "data.pack_tokens=2048" in err and "global batch changes from 2048 to 4096" in err


def test_resume_names_a_damaged_newer_checkpoint_it_skips(tmp_path, capsys):
    run = _finished_run(tmp_path / "run")
    damaged = _save_one_tensor(run, 8)
    with open(damaged / "__0_0.distcp", "r+b") as f:
        f.truncate(10)
    main(["train", "recipes/tiny.yaml", "trainer.resume=true", "trainer.steps=6",
          f"trainer.run_dir={run.path}"])  # stops at the step check, before Ray
    assert f"skipping {damaged}" in capsys.readouterr().err


def test_unwritable_run_dir_exits_2(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    rc = main(["train", "recipes/tiny.yaml", f"trainer.run_dir={tmp_path}/file"])
    assert rc == 2 and "trainer.run_dir" in capsys.readouterr().err


def test_default_run_dirs_of_one_second_are_distinct(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt: "20261122-150000")
    first, second = default_run_dir("recipes/tiny.yaml"), default_run_dir("tiny.yaml")
    assert first != second and first.is_dir() and second.is_dir()
    assert second.name == first.name + "-2"


def test_unreachable_ray_address_is_one_clear_message(tmp_path):
    out = run_distca("train", "recipes/tiny.yaml", "ray.address=127.0.0.1:9",
                     f"trainer.run_dir={tmp_path}/r")
    assert out.returncode == 1 and "127.0.0.1:9" in out.stderr and "does not answer" in out.stderr
    assert "Traceback" not in out.stderr


# ---- one short run through the CLI --------------------------------------------------------
@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("train") / "run"
    log = run_dir.with_name("stdout.log")
    with log.open("w") as out:  # `distca train ... > stdout.log`
        proc = subprocess.Popen(
            distca_cmd("train", "recipes/tiny.yaml", "trainer.steps=4",
                       "trainer.checkpoint_interval=2", "trainer.keep_checkpoints=1",
                       "attention.telemetry_interval=0", f"trainer.run_dir={run_dir}"),
            cwd=REPO, stdout=out, stderr=subprocess.PIPE, text=True)
        watch = SocketWatch(proc.pid)
        _, stderr = proc.communicate(timeout=600)
    stdout = log.read_text()
    watch.stop()
    time.sleep(2)
    leftovers = {pid for pid in watch.pids if os.path.exists(f"/proc/{pid}")
                 and descendants(pid) and "zombie" not in open(f"/proc/{pid}/status").read()}
    return dict(rc=proc.returncode, stdout=stdout, stderr=stderr, run_dir=run_dir, watch=watch,
                leftovers=leftovers)


@pytest.mark.ray
def test_short_run_writes_the_run_directory(short_run):
    assert short_run["rc"] == 0, short_run["stderr"][-3000:]
    run_dir = short_run["run_dir"]
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(FIELDS <= set(r) for r in rows) and all(r["restarts"] == 0 for r in rows)
    assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert load_config(run_dir / "config.yaml").trainer.steps == 4
    workers = json.loads((run_dir / "workers.json").read_text())
    assert [(w["rank"], w["role"]) for w in workers] == [(0, "worker"), (1, "worker")]
    assert all(w["node"] == "127.0.0.1" and w["pid"] > 0 for w in workers)
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "tensorboard").iterdir())
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000004"]
    assert str(run_dir) in short_run["stdout"] and "trained 4 steps" in short_run["stdout"]


@pytest.mark.ray
def test_short_run_logs_one_line_per_step_to_a_file(short_run):
    """Under `> log`, ray job submit or Slurm the tqdm bar was one line of 100 steps joined by
    carriage returns; now each step is a line, and the slow stretches before step 1 say what
    they are."""
    out = short_run["stdout"]
    assert "\r" not in out and "\r" not in short_run["stderr"]
    steps = [STEP_LINE.match(line) for line in out.splitlines()]
    assert [(m[1], m[2]) for m in steps if m] == [(str(s), "4") for s in range(1, 5)]
    assert "starting a local Ray cluster" in out and "building the model" in out
    assert "Apex" not in short_run["stderr"] and "Transformer Engine" not in short_run["stderr"]
    rows = metrics(short_run["run_dir"])
    assert all(0 < r["mfu"] < 1 and r["tflops"] > 0 and r["memory_mb"] > 0 for r in rows)


@pytest.mark.ray
def test_short_run_uses_loopback_only_and_leaves_no_process(short_run):
    watch = short_run["watch"]
    assert len({s for s in watch.sockets if s[0] == "LISTEN"}) >= 3  # Ray's and gloo's listeners
    assert watch.non_loopback() == []
    assert short_run["leftovers"] == set()


# ---- restarts, resume, CAD parity (slow: several runs) -------------------------------------
@pytest.mark.ray
@pytest.mark.slow
def test_killed_worker_is_restarted_from_the_last_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        distca_cmd("train", "recipes/tiny.yaml", "trainer.steps=10", "trainer.checkpoint_interval=3",
                   "trainer.max_restarts=1", f"trainer.run_dir={run_dir}"),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 5:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    before = {r["step"]: r["loss"] for r in metrics(run_dir)}
    victim = json.loads((run_dir / "workers.json").read_text())[1]["pid"]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert "restart 1/1" in stderr and "restarts 1" in stdout
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 11)) and rows[-1]["restarts"] == 1
    new_pids = {w["pid"] for w in json.loads((run_dir / "workers.json").read_text())}
    assert victim not in new_pids
    # steps repeated after the restart reproduce the losses from before the kill
    for r in rows:
        if r["step"] in before:
            assert r["loss"] == pytest.approx(before[r["step"]], rel=1e-5)
    assert time.monotonic() - killed_at < 300


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("layout", [
    pytest.param([], id="same_layout"),
    pytest.param(["parallel.dp=1", "data.tokens_per_rank=2048"], id="dp2_to_dp1",
                 marks=pytest.mark.slow)])
def test_resumed_run_matches_uninterrupted_run(tmp_path, layout):
    """Resumed in the same layout, or with one rank instead of two (the same batches: one
    micro-batch of 2048 tokens; the ZeRO slices of the optimizer state joined)."""
    run_dir = tmp_path / "run"
    args = ["train", "recipes/tiny.yaml", "trainer.steps=6", "trainer.checkpoint_interval=3",
            f"trainer.run_dir={run_dir}"]
    out = run_distca(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    full = {r["step"]: r["loss"] for r in metrics(run_dir)}
    subprocess.run(["rm", "-rf", str(run_dir / "checkpoints" / "step_00000006")], check=True)
    out = run_distca(*args, "trainer.resume=true", *layout)
    assert out.returncode == 0, out.stderr[-3000:]
    # the steps this invocation trained, not the run's total
    assert "trained 3 steps (steps 4-6, resumed at step 3)" in out.stdout
    resumed = metrics(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for r in resumed[3:]:
        assert r["loss"] == pytest.approx(full[r["step"]], rel=1e-5 if not layout else 1e-4)


@pytest.mark.ray
@pytest.mark.slow
def test_cad_on_and_off_log_the_same_losses(tmp_path):
    losses = {}
    for cad in ("true", "false"):
        out = run_distca("train", "recipes/tiny.yaml", "trainer.steps=5", f"cad.enabled={cad}",
                         f"trainer.run_dir={tmp_path}/{cad}")
        assert out.returncode == 0, out.stderr[-3000:]
        losses[cad] = [r["loss"] for r in metrics(tmp_path / cad)]
    for a, b in zip(losses["true"], losses["false"], strict=True):
        assert abs(a - b) <= 1e-4 * abs(b)


@pytest.mark.ray
@pytest.mark.slow
def test_nan_loss_with_on_nan_stop_exits_nonzero_and_keeps_the_checkpoint(tmp_path):
    out = run_distca("train", "recipes/tiny.yaml", "trainer.steps=8", "trainer.checkpoint_interval=1",
                     "optim.lr=1.0e12", "optim.min_lr=1.0e12", "optim.grad_clip=0",
                     "optim.warmup_fraction=0", f"trainer.run_dir={tmp_path}/r")
    assert out.returncode == 1 and "trainer.on_nan=stop" in out.stderr
    assert "Traceback" not in out.stderr
    ckpts = sorted((tmp_path / "r" / "checkpoints").iterdir())
    assert ckpts and all(p.name.startswith("step_") for p in ckpts)


@pytest.mark.ray
@pytest.mark.slow
def test_on_nan_rollback_reloads_the_checkpoint_and_gives_up_when_it_keeps_failing(tmp_path):
    out = run_distca("train", "recipes/tiny.yaml", "trainer.steps=8", "trainer.checkpoint_interval=1",
                     "trainer.on_nan=rollback", "trainer.max_restarts=2", "optim.lr=1.0e12",
                     "optim.min_lr=1.0e12", "optim.grad_clip=0", "optim.warmup_fraction=0",
                     f"trainer.run_dir={tmp_path}/r")
    assert out.returncode == 1 and out.stderr.count("rolled back to step_") == 2
    assert "giving up after 2 restarts" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_on_nan_skip_finishes_the_run_without_applying_a_bad_update(tmp_path):
    out = run_distca("train", "recipes/tiny.yaml", "trainer.steps=5", "trainer.checkpoint_interval=5",
                     "trainer.on_nan=skip", "optim.lr=1.0e12", "optim.min_lr=1.0e12",
                     "optim.grad_clip=0", "optim.warmup_fraction=0", f"trainer.run_dir={tmp_path}/r")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = metrics(tmp_path / "r")
    bad = [r for r in rows if r["loss"] is None or not math.isfinite(r["loss"])]  # JSON null = NaN
    assert bad and all(r["skipped"] for r in bad) and "update skipped" in out.stderr
    # the huge learning rate wrecks the loss, but a skipped step never writes NaN/inf weights
    (step_dir,) = (tmp_path / "r" / "checkpoints").iterdir()
    for part in ("model", "exp_avg", "exp_avg_sq"):
        for name, tensor in read_whole(step_dir, part).items():
            assert torch.isfinite(tensor).all(), (part, name)
