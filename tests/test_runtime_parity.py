"""Parity of the distributed engine with a single-process colocated reference (gloo, CPU).

For the same weights and global batch, the loss and every parameter gradient of a multi-rank
run must equal the reference's (fp32, relative error < 1e-5): ping-pong on and off, eps = 0 and
0.1, documents longer than one worker's share, one-token documents, gated attention and sinks.
"""

from __future__ import annotations

import pytest
from runtime_harness import assert_parity, run_ranks, skewed_batch

T = 64  # tokens per worker
# A document longer than one worker's share, one-token documents, padding at the end.
DOCS = [90, 1, 17, 1, 12]
SKEWED = [64, 1, 5, 8, 3, 9, 1, 20, 7]  # one long document on worker 0, short ones on worker 1
GATED_SINKS = ["model.gated_attention=true", "model.learnable_sinks=true"]


def _scenarios(world: int, extended: bool):
    """Scenarios for ``world`` ranks; ``extended`` adds the ones only the slow suite runs."""
    docs = DOCS + [1] * (world - 2) * T  # more workers: their slices hold one-token documents
    batches = [skewed_batch(world, T, docs, seed=1), skewed_batch(world, T, SKEWED, seed=2)]
    base = [f"parallel.dp={world}", "trainer.seed=7", "cad.min_shard_tokens=4", "cad.enabled=true"]
    scenarios = [
        ("eps0_blocking", base + ["cad.tolerance=0", "cad.ping_pong=false"], batches),
        ("eps0.1_pingpong_gated_sinks",
         base + ["cad.tolerance=0.1", "cad.ping_pong=true"] + GATED_SINKS, batches),
    ]
    if extended:
        scenarios += [
            ("colocated", base + ["cad.enabled=false"], batches),
            ("eps0_pingpong", base + ["cad.tolerance=0", "cad.ping_pong=true"], batches),
            ("eps0.1_blocking_gated_sinks",
             base + ["cad.tolerance=0.1", "cad.ping_pong=false"] + GATED_SINKS, batches),
        ]
    return scenarios


def _check(world: int, extended: bool, out) -> None:
    scenarios = _scenarios(world, extended)
    run_ranks(world, scenarios, out)
    run_ranks(1, scenarios, out, reference=True)
    assert_parity(out, scenarios, world)


def test_two_ranks_match_single_process_reference(tmp_path):
    _check(2, extended=False, out=tmp_path)


@pytest.mark.slow
def test_two_ranks_more_scenarios_match_reference(tmp_path):
    _check(2, extended=True, out=tmp_path)


@pytest.mark.slow
def test_four_ranks_match_single_process_reference(tmp_path):
    _check(4, extended=True, out=tmp_path)
