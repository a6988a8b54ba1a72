"""Re-run issue 21's adversarial list: every case must end in a clear message, never a
traceback and never silently.

    .venv/bin/python tests/adversarial.py          # the cases that need no Ray (~1 min)
    .venv/bin/python tests/adversarial.py --ray    # also the Ray ones (kills, stops; ~10 min)

Each case runs the ``distca`` CLI (or, for a full disk, the metrics writer) in a subprocess
and is counted as

- clear: it failed with exit code 1 or 2 naming what is at fault, or it recovered and said so
  (a damaged checkpoint skipped, a stalled rank restarted);
- traceback: Python's traceback reached the user;
- silent: it succeeded without the warning it owes, or hung past its time limit, or failed
  without naming the culprit.

Prints one line per case and ``tried N, clear N, tracebacks N, silent N``; exits 1 unless
the last two are 0. Not collected by pytest (its name does not start with ``test_``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DISTCA = str(Path(sys.executable).parent / "distca")
TRAIN = [DISTCA, "train", "recipes/tiny.yaml", "attention.telemetry_interval=0"]


@dataclass
class Case:
    name: str
    run: Callable[[Path], tuple[int | None, str]]  # (exit code or None on timeout, stderr)
    needle: str  # what stderr must say
    rc: tuple[int, ...] = (1, 2)  # the exit codes that count as handled
    ray: bool = False


def cli(*args: str, timeout: float = 120) -> Callable[[Path], tuple[int | None, str]]:
    """A case that runs ``args`` (``{tmp}`` is replaced by the case's directory)."""
    def run(tmp: Path) -> tuple[int | None, str]:
        argv = [a.replace("{tmp}", str(tmp)) for a in args]
        try:
            out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            return None, (exc.stderr or b"").decode(errors="replace")
        return out.returncode, out.stderr
    return run


def then(prepare: Callable[[Path], None], run: Callable) -> Callable:
    def both(tmp: Path):
        prepare(tmp)
        return run(tmp)
    return both


# ---- fixtures: files and checkpoints the cases damage --------------------------------------
def write(name: str, content: bytes) -> Callable[[Path], None]:
    return lambda tmp: (tmp / name).write_bytes(content)


BOMB = "\n".join(["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
                 + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)])
TINY_MODEL = """
import sys, torch, torch.distributed as dist
from distca.config import ModelConfig
from distca.hf.io import write_checkpoint
from distca.hf.local import LocalModel, single_rank_config
from distca.train.checkpoint import begin_save, commit, rank_files
from distca.train.sharded_state import read_whole, write_whole
dist.init_process_group("gloo", init_method=f"file://{sys.argv[1]}/pg", rank=0, world_size=1)
m = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2,
                ffn_hidden_size=96, vocab_size=256)
step0 = write_checkpoint(sys.argv[1] + "/run", m, LocalModel(single_rank_config(m, "torch"))
                         .model_state(), origin="adversarial")
tmp = begin_save(step0.parent, 5)
write_whole(tmp, read_whole(step0))
commit(tmp, 5, {}, rank_files(tmp, 0))
"""


def tiny_run(damage: str) -> Callable[[Path], None]:
    """A run with checkpoints at steps 0 and 5; step 5's data file damaged by ``damage``:
    ``exponent`` (one bit in the middle of the tensor data, same size), ``header``,
    ``truncate`` or ``none``."""
    def prepare(tmp: Path) -> None:
        subprocess.run([sys.executable, "-c", TINY_MODEL, str(tmp)], cwd=REPO, check=True,
                       capture_output=True)
        flip(tmp / "run" / "checkpoints" / "step_00000005", damage)
    return prepare


def flip(step_dir: Path, damage: str) -> None:
    if damage == "none":
        return
    shard = step_dir / "__0_0.distcp"  # torch.distributed.checkpoint's file of rank 0
    raw = bytearray(shard.read_bytes())
    if damage == "truncate":
        raw = raw[:-100]
    elif damage == "header":
        raw[10] ^= 0xFF
    else:
        raw[len(raw) // 2] ^= 0x40
    shard.write_bytes(bytes(raw))


FULL_DISK = """
import sys
from pathlib import Path
from distca.train.errors import TrainingStopped
from distca.train.metrics import MetricsLog
log = MetricsLog(Path(sys.argv[1]) / "metrics.jsonl", Path(sys.argv[1]) / "tb", 0)
log._file = open("/dev/full", "a")  # every write fails with ENOSPC, as on a full disk
try:
    log.log({"step": 1, "loss": 1.0})
except TrainingStopped as exc:  # what `distca train` prints for it
    sys.exit(f"distca: error: {exc}")
"""

EVAL = [DISTCA, "eval", "--task", "vt", "--length", "300", "--n", "1", "--max-new-tokens", "1"]


# ---- cases that start Ray -------------------------------------------------------------------
def during_run(act: Callable[[subprocess.Popen, Path], None], *overrides: str,
               after_steps: int = 3, timeout: float = 600) -> Callable:
    """Start a run, wait for ``after_steps`` steps, ``act`` on it, wait for its end."""
    def run(tmp: Path):
        run_dir = tmp / "run"
        proc = subprocess.Popen([*TRAIN, f"trainer.run_dir={run_dir}", *overrides], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout
        rows = run_dir / "metrics.jsonl"
        while proc.poll() is None and time.monotonic() < deadline:
            if rows.exists() and len(rows.read_text().splitlines()) >= after_steps:
                act(proc, run_dir)
                break
            time.sleep(0.2)
        try:
            _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            return None, proc.communicate()[1]
        return proc.returncode, err
    return run


def kill_rank(sig: int) -> Callable:
    def act(proc, run_dir):
        os.kill(json.loads((run_dir / "workers.json").read_text())[1]["pid"], sig)
    return act


def resume_after(damage: Callable[[Path], None]) -> Callable:
    """Train 4 steps (checkpoints at 2 and 4), ``damage`` the run, resume to step 6."""
    def run(tmp: Path):
        run_dir = tmp / "run"
        common = [f"trainer.run_dir={run_dir}", "trainer.checkpoint_interval=2",
                  "trainer.keep_checkpoints=2"]
        first = subprocess.run([*TRAIN, "trainer.steps=4", *common], cwd=REPO,
                               capture_output=True, text=True, timeout=600)
        if first.returncode != 0:
            return first.returncode, first.stderr
        damage(run_dir)
        return cli(*TRAIN, "trainer.steps=6", "trainer.resume=true", *common, timeout=600)(tmp)
    return run


def killed_driver(tmp: Path):
    """kill -9 the driver mid-run; the next start must clean up after it."""
    def act(proc, run_dir):
        proc.kill()
    during_run(act, "trainer.steps=60")(tmp)
    return cli(*TRAIN, "trainer.steps=1", f"trainer.run_dir={tmp}/next", timeout=600)(tmp)


def tear_metrics(run_dir: Path) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')


CASES = [
    # resource-blind starts: refused before Ray, naming the key
    Case("parallel.dp=1000", cli(*TRAIN, "parallel.dp=1000"), "parallel.dp"),
    Case("data.tokens_per_rank=10**12", cli(*TRAIN, f"data.tokens_per_rank={10**12}"),
         "data.tokens_per_rank"),
    Case("data.micro_batches=10**7", cli(*TRAIN, f"data.micro_batches={10**7}"),
         "data.micro_batches"),
    Case("model.hidden_size=65536", cli(*TRAIN, "model.hidden_size=65536"), "model.hidden_size"),
    Case("eval --length 10**11", then(tiny_run("none"), cli(
        DISTCA, "eval", "{tmp}/run", "--task", "vt", "--length", str(10**11), "--n", "1")),
        "--length"),
    Case("plan --servers 10**7", cli(DISTCA, "plan", "--lengths", "4096,2048",
                                     "--servers", str(10**7)), "--servers"),
    # accepted, then failing late or silently wrong
    Case("parallel.backend=nccl without CUDA", cli(*TRAIN, "parallel.backend=nccl"),
         "parallel.backend"),
    Case("attention.backend=flash without CUDA", cli(*TRAIN, "attention.backend=flash"),
         "attention.backend"),
    Case("trainer.seed=2**64", cli(*TRAIN, f"trainer.seed={2**64}"), "trainer.seed"),
    Case("ray.num_gpus_per_worker=1 without a GPU", cli(*TRAIN, "ray.num_gpus_per_worker=1"),
         "ray.num_gpus_per_worker"),
    Case("data.max_length=10**12", cli(*TRAIN, f"data.max_length={10**12}"), "data.max_length"),
    Case("trainer.step_timeout_s=-1", cli(*TRAIN, "trainer.step_timeout_s=-1"),
         "trainer.step_timeout_s"),
    Case("trainer.call_timeout_s=-1", cli(*TRAIN, "trainer.call_timeout_s=-1"),
         "trainer.call_timeout_s"),
    Case("random bytes as .txt data", then(write("x.txt", os.urandom(4096).replace(b"\0", b"1")),
         cli(*TRAIN, "data.kind=text", "data.paths=[{tmp}/x.txt]")), "not valid UTF-8 at byte"),
    Case("latin-1 .txt data", then(write("x.txt", "café crème brûlée".encode("latin-1") * 50),
         cli(*TRAIN, "data.kind=text", "data.paths=[{tmp}/x.txt]")), "not valid UTF-8 at byte 3"),
    Case("NUL bytes in .txt data", then(write("x.txt", b"abc\0def" * 100),
         cli(*TRAIN, "data.kind=text", "data.paths=[{tmp}/x.txt]")), "NUL bytes"),
    Case("latin-1 JSONL data", then(write("x.jsonl", '{"text": "café"}\n'.encode("latin-1")),
         cli(*TRAIN, "data.kind=text", "data.paths=[{tmp}/x.jsonl]")), "x.jsonl:1"),
    Case("binary recipe", then(write("r.yaml", b"model:\n  preset: tiny\n\xff\xfe\x00\x01"),
         cli(DISTCA, "train", "{tmp}/r.yaml")), "not UTF-8 text"),
    Case("YAML alias bomb in config show", then(write("r.yaml", BOMB.encode()),
         cli(DISTCA, "config", "show", "{tmp}/r.yaml", timeout=60)), "expands to more than"),
    Case("model: 5", then(write("r.yaml", b"model: 5\n"), cli(DISTCA, "config", "show",
                                                              "{tmp}/r.yaml")), "model: must be a mapping"),
    # silent corruption of checkpoints
    Case("eval of a run whose newest checkpoint has a flipped bit", then(tiny_run("exponent"),
         cli(*EVAL[:2], "{tmp}/run", *EVAL[2:])), "sha256", rc=(0,)),
    Case("eval of a run whose newest checkpoint has a damaged header", then(tiny_run("header"),
         cli(*EVAL[:2], "{tmp}/run", *EVAL[2:])), "skipping", rc=(0,)),
    Case("eval of a run whose newest checkpoint is cut short", then(tiny_run("truncate"),
         cli(*EVAL[:2], "{tmp}/run", *EVAL[2:])), "skipping", rc=(0,)),
    Case("eval of the damaged step directory", then(tiny_run("exponent"), cli(
        *EVAL[:2], "{tmp}/run/checkpoints/step_00000005", *EVAL[2:])), "__0_0.distcp"),
    Case("export-hf of the damaged step directory", then(tiny_run("exponent"), cli(
        DISTCA, "export-hf", "{tmp}/run/checkpoints/step_00000005", "{tmp}/hf")), "sha256"),
    Case("eval of the checkpoints directory", then(tiny_run("none"), cli(
        *EVAL[:2], "{tmp}/run/checkpoints", *EVAL[2:])), "give the run directory"),
    # full disk
    Case("ENOSPC while writing metrics.jsonl", lambda tmp: cli(sys.executable, "-c", FULL_DISK,
         str(tmp))(tmp), "No space left on device"),
    # with Ray: deaths, stops, hangs, resumes of damaged runs
    Case("kill -9 of a worker", during_run(kill_rank(signal.SIGKILL), "trainer.steps=8",
         "trainer.checkpoint_interval=3"), "restart 1/", rc=(0,), ray=True),
    Case("SIGSTOP of a worker", during_run(kill_rank(signal.SIGSTOP), "trainer.steps=8",
         "trainer.checkpoint_interval=3", "trainer.step_timeout_s=20"), "made no progress",
         rc=(0,), ray=True),
    Case("SIGTERM to the driver", during_run(lambda p, d: p.send_signal(signal.SIGTERM),
         "trainer.steps=60"), "stopped by SIGTERM after step", rc=(143,), ray=True),
    Case("SIGINT (Ctrl-C) to the driver", during_run(lambda p, d: p.send_signal(signal.SIGINT),
         "trainer.steps=60"), "stopped by SIGINT after step", rc=(130,), ray=True),
    Case("resume with a flipped exponent bit in the newest shard", resume_after(
        lambda d: flip(d / "checkpoints" / "step_00000004", "exponent")), "sha256", rc=(0,),
         ray=True),
    Case("resume with a torn last metrics line", resume_after(tear_metrics),
         "dropping a torn last line", rc=(0,), ray=True),
    Case("kill -9 of the driver, then a new run", killed_driver, "left by driver", rc=(0,),
         ray=True),
]


def classify(case: Case, rc: int | None, err: str) -> str:
    if "Traceback (most recent call last)" in err:
        return "traceback"
    if rc in case.rc and case.needle in err:
        return "clear"
    return "silent"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ray", action="store_true", help="also the cases that start Ray")
    parser.add_argument("-k", default="", help="only cases whose name contains this")
    args = parser.parse_args()
    counts = {"clear": 0, "traceback": 0, "silent": 0}
    for case in CASES:
        if (case.ray and not args.ray) or args.k not in case.name:
            continue
        with tempfile.TemporaryDirectory(prefix="distca-adversarial-") as tmp:
            start = time.monotonic()
            rc, err = case.run(Path(tmp))
            verdict = classify(case, rc, err)
        counts[verdict] += 1
        lines = [line for line in err.splitlines() if "distca" in line] or err.splitlines()[-1:]
        print(f"{verdict:9s} rc={rc} {time.monotonic() - start:5.1f}s  {case.name}: "
              f"{(lines[-1] if lines else '')[:160]}", flush=True)
    tried = sum(counts.values())
    print(f"tried {tried}, clear {counts['clear']}, tracebacks {counts['traceback']}, "
          f"silent {counts['silent']}")
    return 0 if counts["traceback"] == counts["silent"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
