"""Predicted vs measured peak memory of a training step, side by side (``distca memory``'s model).

Every row is a tiny or small Llama-like model on the CPU (fp32, ``dp = 1``, core attention
through the in-place exchange) at a sequence length of 2K-32K tokens a rank, with
``model.recompute`` none or full, on 1 or 2 tensor-parallel ranks (with and without sequence
parallelism). Each rank runs in a fresh
process: after torch and the process group are up it reads its resident set (the baseline),
resets the high-water mark (``/proc/self/clear_refs``), builds the model and runs two optimizer
steps (the second holds AdamW's state) on one micro-batch whose documents are drawn from the
recipe's length distribution like the estimator's. The measured peak is the high-water mark
above the baseline, the largest rank's. glibc's mmap threshold is fixed
(``MALLOC_MMAP_THRESHOLD_``) so freed tensors leave the resident set instead of a growing heap.

    python benchmarks/memory.py --out benchmarks/results/memory.md

The table gives the predicted peak with its parts, the measured peak and their ratio; for each
``full`` row the measured activation saving against its ``none`` row beside the predicted one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.hidden_size=128", "model.ffn_hidden_size=352"]
SMALL = ["model.hidden_size=256", "model.ffn_hidden_size=704", "model.num_attention_heads=4"]
ROWS = [("tiny", TINY, 2048, 1), ("tiny", TINY, 8192, 1), ("tiny", TINY, 32768, 1),
        ("small", SMALL, 8192, 1), ("small", SMALL, 16384, 1), ("small", SMALL, 8192, 2),
        ("small+sp", [*SMALL, "parallel.sequence_parallel=true"], 8192, 2)]
MODES = ("none", "full")


def overrides(model: list[str], seq: int, tp: int, mode: str) -> list[str]:
    return [*model, "model.num_layers=4", "parallel.dp=1", f"parallel.tp={tp}",
            f"data.tokens_per_rank={seq}", "data.max_length=2048", f"model.recompute={mode}",
            "trainer.precision=fp32"]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def worker(args: argparse.Namespace) -> None:
    """One rank: print its measured peak above the baseline (bytes) as JSON."""
    import torch

    from distca.batch import PackedBatch
    from distca.bootstrap import start_process_group
    from distca.config import DistBackend, load_config
    from distca.memory.attention import sample_documents
    from distca.rank import make_rank

    torch.set_num_threads(1)
    cfg = load_config(ROOT / "recipes/tiny.yaml", json.loads(args.worker))
    init = f"tcp://127.0.0.1:{args.port}" if args.world > 1 else None
    start_process_group(DistBackend.gloo, args.rank, args.world, init, interface="lo")
    import numpy as np

    docs = sample_documents(cfg, 0)
    rng = np.random.default_rng(0)
    n = cfg.data.tokens_per_rank
    batch = PackedBatch(rng.integers(0, cfg.model.vocab_size, n),
                        rng.integers(0, cfg.model.vocab_size, n), docs, n)
    baseline = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    step = make_rank(cfg)
    for _ in range(2):
        step.train_step([batch])
    peak = (_status_kib("VmHWM") - baseline) * 1024
    print(json.dumps({"rank": args.rank, "peak": peak}))


def measure(over: list[str], tp: int) -> float:
    """The largest rank's measured peak above its baseline, bytes."""
    from distca.profile.comm import free_port

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1")
    port = free_port()
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(over),
                               "--rank", str(r), "--world", str(tp), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                              text=True) for r in range(tp)]
    peaks = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise RuntimeError(f"worker failed ({p.returncode}) for {over}")
        peaks.append(json.loads(out.strip().splitlines()[-1])["peak"])
    return max(peaks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the markdown table here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args)
        return
    from distca.config import load_config
    from distca.memory.estimate import estimate

    mib = 2**20
    lines = ["| model | tokens | tp | recompute | runtime+weights+grads+optim | activations "
             "| attention "
             "| logits | update | predicted MiB | measured MiB | measured/predicted "
             "| activation saving measured / predicted |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    worst = 0.0
    for name, model, seq, tp in ROWS:
        seen = {}
        for mode in MODES:
            over = overrides(model, seq, tp, mode)
            est = estimate(load_config(ROOT / "recipes/tiny.yaml", over))
            got = measure(over, tp)
            seen[mode] = (est.total, got)
            p = est.parts
            ratio = got / est.total
            worst = max(worst, abs(ratio - 1))
            saving = ""
            if mode == "full":
                saving = (f"{(seen['none'][1] - got) / mib:.0f} / "
                          f"{(seen['none'][0] - est.total) / mib:.0f} MiB")
            lines.append(
                f"| {name} | {seq} | {tp} | {mode} | "
                f"{(p['runtime'] + p['weights'] + p['gradients'] + p['optimizer']) / mib:.1f} | "
                f"{p['activations'] / mib:.0f} | {p['attention_buffers'] / mib:.0f} | "
                f"{p['logits'] / mib:.0f} | {p['update_buffers'] / mib:.0f} | "
                f"{est.total / mib:.0f} | {got / mib:.0f} | {ratio:.2f} | {saving} |")
            print(lines[-1], flush=True)
    lines.append(f"\nLargest deviation of measured from predicted: {100 * worst:.1f}% "
                 f"({'within' if worst <= 0.15 else 'NOT within'} the 15% goal).")
    import platform

    import torch

    head = (f"# Predicted vs measured peak memory (MiB, the largest rank)\n\n`python "
            f"benchmarks/memory.py` on {platform.machine()} {platform.system()}, torch "
            f"{torch.__version__}, fp32, 4 layers, one thread a rank. Measured: resident-set "
            f"high-water mark above the rank's baseline over two optimizer steps.\n\n")
    text = head + "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
