"""Fingerprints of fixed training runs: the losses, grad norms and final weights of a few steps.

Run before and after a change of the runtime that must not change any number::

    python tests/runtime_fingerprint.py --out before.json
    python tests/runtime_fingerprint.py --out after.json --compare before.json

Each scenario trains the tiny recipe for ``--steps`` optimizer steps on fixed skewed batches
(gloo ranks on 127.0.0.1, fp32) and records, per step, every worker-rank statistic that is a
number of the computation (loss, grad norm, inner losses, imbalance, sink mass), plus a SHA-256
of the final whole-model weights. ``--compare`` reports each value that is not bitwise equal.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from runtime_harness import multiturn_docs

from distca.batch import PackedBatch
from distca.config import load_config
from distca.data.chat import pack_conversations
from distca.profile.comm import free_port
from distca.rank import make_rank

ROOT = Path(__file__).resolve().parents[1]  # tests/ is beside recipes/
T = 64
SINKS = ["model.gated_attention=true", "model.learnable_sinks=true",
         "attention.telemetry_interval=1"]
CAD = ["trainer.seed=7", "cad.min_shard_tokens=4", "cad.enabled=true", "cad.tolerance=0.1"]
DEDICATED = ["cad.server_mode=dedicated", "cad.num_dedicated_servers=1"]

# name -> (recipe, world size, overrides)
SCENARIOS = {
    "colocated_dp2": ("tiny", 2, ["trainer.seed=7", "parallel.dp=2", "cad.enabled=false"]),
    "cad_dp2_blocking": ("tiny", 2, CAD + SINKS + ["parallel.dp=2", "cad.ping_pong=false"]),
    "cad_dp2_pingpong": ("tiny", 2, CAD + SINKS + ["parallel.dp=2", "cad.ping_pong=true"]),
    "dedicated_dp2_pingpong": ("tiny", 3, CAD + SINKS + DEDICATED
                               + ["parallel.dp=2", "cad.ping_pong=true"]),
    "dedicated_dp2_blocking": ("tiny", 3, CAD + DEDICATED
                               + ["parallel.dp=2", "cad.ping_pong=false"]),
    "cad_tp2": ("tiny", 2, CAD + SINKS + ["parallel.dp=1", "parallel.tp=2", "cad.ping_pong=true"]),
    "cad_pp2_pingpong": ("tiny", 2, CAD + SINKS + ["parallel.dp=1", "parallel.pp=2",
                                                   "cad.ping_pong=true"]),
    "cad_pp2_blocking": ("tiny", 2, CAD + ["parallel.dp=1", "parallel.pp=2", "cad.ping_pong=false"]),
    "colocated_pp2": ("tiny", 2, ["trainer.seed=7", "parallel.dp=1", "parallel.pp=2",
                                  "cad.enabled=false"]),
    "cad_dp2_pp2_pingpong": ("tiny", 4, CAD + SINKS + ["parallel.dp=2", "parallel.pp=2",
                                                       "cad.ping_pong=true"]),
    "focusft_dp2": ("tiny-focusft", 2, CAD + ["parallel.dp=2", "model.learnable_sinks=true",
                                              "attention.telemetry_interval=1",
                                              "data.kind=chat", "data.paths=[unused.jsonl]"]),
    "focusft_dp2_dedicated": ("tiny-focusft", 3, CAD + DEDICATED
                              + ["parallel.dp=2", "focusft.layer_fraction=0.75",
                                 "data.kind=chat", "data.paths=[unused.jsonl]"]),
}
# statistics that are measurements of time or of the machine, not of the computation
UNTIMED = ("step_time_s", "tokens")


def text_batch(dp: int, seed: int) -> PackedBatch:
    """Skewed documents: one long one spanning workers, short ones, one-token ones, padding."""
    rng = np.random.default_rng(seed)
    n = dp * T
    docs = [int(0.7 * n), 1, 5, 1] + [3] * ((n - int(0.7 * n) - 7) // 3 - 2)
    tokens, labels = rng.integers(0, 512, n), rng.integers(0, 512, n)
    labels[sum(docs):] = -100
    labels[rng.random(n) < 0.1] = -100
    return PackedBatch(tokens, labels, np.asarray(docs, dtype=np.int64), T)


def chat_batch(dp: int, seed: int) -> PackedBatch:
    """Multi-turn conversations (alternating context and reply turns), one spanning workers."""
    return pack_conversations(multiturn_docs(seed, [int(0.6 * dp * T), 1, 9, 20, 7]), dp, T)


def _rank_main(rank: int, world: int, port: int, name: str, steps: int, outfile: str) -> None:
    torch.manual_seed(0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    recipe, _, overrides = SCENARIOS[name]
    cfg = load_config(ROOT / "recipes" / f"{recipe}.yaml", list(overrides))
    role = make_rank(cfg)
    make = chat_batch if cfg.focusft.enabled else text_batch
    records = []
    for step in range(steps):
        micro = [make(cfg.parallel.dp, 100 * step + i) for i in range(3 if cfg.parallel.pp > 1
                                                                      else 2)]
        stats = role.train_step(micro)
        records.append({k: v for k, v in stats.items() if k not in UNTIMED})
    weights = None
    if role.role.holds_weights:  # a dedicated attention server holds none
        full = role.full_model_state()
        digest = hashlib.sha256()
        for key in sorted(full):
            digest.update(key.encode())
            digest.update(full[key].detach().float().numpy().tobytes())
        weights = digest.hexdigest()
    if rank == 0:
        Path(outfile).write_text(json.dumps({"steps": records, "weights": weights}))
    dist.destroy_process_group()


def run(names: list[str], steps: int, timeout_s: float) -> dict:
    """Every scenario's record; a scenario whose ranks do not finish within ``timeout_s``
    (a hang: mismatched collectives) is recorded as ``{"hung": true}``."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            world = SCENARIOS[name][1]
            out = Path(tmp) / f"{name}.json"
            ranks = mp.start_processes(_rank_main, args=(world, free_port(), name, steps,
                                                         str(out)),
                                       nprocs=world, join=False, start_method="spawn")
            deadline = time.monotonic() + timeout_s
            failed = None
            try:
                while not ranks.join(timeout=1.0):
                    if time.monotonic() > deadline:
                        for process in ranks.processes:
                            process.kill()
                        break
            except mp.ProcessException as exc:  # a rank raised: recorded, the others go on
                failed = str(exc).strip().splitlines()[-1]
            results[name] = ({"failed": failed} if failed else
                             json.loads(out.read_text()) if out.exists() else {"hung": True})
            losses = [round(s["loss"], 6) for s in results[name].get("steps", [])]
            print(f"{name}: loss {losses or failed or 'HUNG'}", flush=True)
    return results


def _outcome(record: dict) -> str:
    return "hung" if record.get("hung") else "failed" if record.get("failed") else "ran"


def compare(got: dict, want: dict) -> list[str]:
    """Every value of ``want`` that ``got`` does not reproduce bitwise (floats via repr)."""
    diffs = []
    for name, run_ in want.items():
        if name not in got:
            continue
        before, now = (_outcome(r) for r in (run_, got[name]))
        if before != now:
            diffs.append(f"{name}: {before} before, {now} now")
        if "ran" != before or before != now:
            continue
        for i, (a, b) in enumerate(zip(got[name]["steps"], run_["steps"])):
            for key in sorted(set(a) | set(b)):
                if repr(a.get(key)) != repr(b.get(key)):
                    diffs.append(f"{name} step {i} {key}: {a.get(key)!r} != {b.get(key)!r}")
        if got[name]["weights"] != run_["weights"]:
            diffs.append(f"{name}: final weights differ")
    return diffs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--compare", type=Path, help="an earlier --out file to compare with")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per scenario")
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), help="scenarios to run")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds a scenario may take before it counts as hung")
    args = parser.parse_args()
    results = run(args.only or list(SCENARIOS), args.steps, args.timeout)
    args.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    if args.compare is None:
        return 0
    diffs = compare(results, json.loads(args.compare.read_text()))
    print("\n".join(diffs) if diffs else f"all {len(results)} scenarios bitwise equal")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
