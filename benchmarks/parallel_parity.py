"""Print the parity table of the TP/PP layouts: worst loss and gradient relative errors.

Runs the scenarios of ``tests/test_parallel_tp_pp.py`` (2 and 4 gloo ranks) and their
single-process colocated references, and prints one markdown row per scenario.
Usage: ``.venv/bin/python -W ignore benchmarks/parallel_parity.py``
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

for folder in ("tests", "tests/integration"):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / folder))

import test_parallel_tp_pp as layouts  # noqa: E402
from runtime_harness import load_reference, load_result, relative_error, run_ranks  # noqa: E402


def main() -> None:
    for world, scenarios in ((2, layouts._two_rank_scenarios()),
                             (4, layouts._four_rank_scenarios())):
        out = Path(tempfile.mkdtemp())
        start = time.perf_counter()
        run_ranks(world, scenarios, out)
        mid = time.perf_counter()
        run_ranks(1, scenarios, out, reference=True)
        print(f"world {world}: distributed spawn {mid - start:.1f} s, "
              f"reference spawn {time.perf_counter() - mid:.1f} s")
        for name, overrides, batches in scenarios:
            ref = load_reference(out, overrides, batches)
            got = [load_result(out, name, r) for r in range(world)]
            loss_err = max(abs(g["loss"] - ref["loss"]) / abs(ref["loss"]) for g in got)
            grad_err = max(relative_error(g["grads"][k], v) for g in got
                           for k, v in ref["grads"].items())
            # lock-step only: score pairs each rank served while its own stage idled
            bubble = " / ".join(str(int(g["bubble_served_pairs"])) for g in got
                                if "bubble_served_pairs" in g) or "-"
            print(f"| {name} | {world} | {loss_err:.1e} | {grad_err:.1e} | {len(ref['grads'])} "
                  f"| {bubble} |")


if __name__ == "__main__":
    main()
