"""Tensor- and pipeline-parallel parity with a single-process colocated reference (gloo, CPU).

For the same weights and global batch, the loss and every parameter gradient of a TP=2 or PP=2
run (TP shards and PP stages gathered into the full model) equal the reference's (fp32,
relative error < 1e-5), with disaggregated attention on, ping-pong on and off, gated attention
and learnable sinks (sinks shard with their heads).
"""

from __future__ import annotations

import pytest
from runtime_harness import ROOT, assert_parity, run_ranks, skewed_batch

from distca.config import ConfigError, load_config

T = 64  # tokens per data-parallel worker
ONE_WORKER_DOCS = [30, 1, 9, 1, 12]  # one-token documents and padding in one worker's share
TWO_WORKER_DOCS = [90, 1, 17, 1, 12]  # the first document spans both workers
GATED_SINKS = ["model.gated_attention=true", "model.learnable_sinks=true"]
BASE = ["trainer.seed=7", "cad.min_shard_tokens=4", "cad.enabled=true"]


def _two_rank_scenarios():
    """TP=2 and PP=2 on two ranks (one data-parallel worker each)."""
    one = [skewed_batch(1, T, ONE_WORKER_DOCS, seed=1)]
    three = one + [skewed_batch(1, T, [64], seed=2), skewed_batch(1, T, [5, 1, 40], seed=3)]
    tp2 = BASE + ["parallel.dp=1", "parallel.tp=2"] + GATED_SINKS
    pp2 = BASE + ["parallel.dp=1", "parallel.pp=2"] + GATED_SINKS
    return [
        ("tp2_pingpong", tp2 + ["cad.tolerance=0.1", "cad.ping_pong=true"], one),
        ("tp2_blocking", tp2 + ["cad.tolerance=0", "cad.ping_pong=false"], one),
        # Three micro-batches: 1F1B warm-up, steady state and drain on both stages.
        ("pp2_pingpong", pp2 + ["cad.tolerance=0.1", "cad.ping_pong=true"], three),
    ]


def _four_rank_scenarios():
    """DP=2 x TP=2 and DP=2 x PP=2: CA-tasks move within each data-parallel group."""
    batches = [skewed_batch(2, T, TWO_WORKER_DOCS, seed=4),
               skewed_batch(2, T, [64, 1, 5, 8, 3, 9, 1, 20, 7], seed=5)]
    return [
        ("dp2_tp2_pingpong", BASE + ["parallel.dp=2", "parallel.tp=2", "cad.tolerance=0",
                                     "cad.ping_pong=true"] + GATED_SINKS, batches),
        ("dp2_tp2_blocking", BASE + ["parallel.dp=2", "parallel.tp=2", "cad.tolerance=0.1",
                                     "cad.ping_pong=false"] + GATED_SINKS, batches),
        ("dp2_pp2_pingpong", BASE + ["parallel.dp=2", "parallel.pp=2", "cad.tolerance=0.1",
                                     "cad.ping_pong=true"] + GATED_SINKS, batches),
    ]


def _check(world: int, scenarios, out) -> None:
    run_ranks(world, scenarios, out)
    run_ranks(1, scenarios, out, reference=True)
    assert_parity(out, scenarios, world)


def test_tp2_and_pp2_match_single_process_reference(tmp_path):
    _check(2, _two_rank_scenarios(), tmp_path)


@pytest.mark.slow
def test_dp2_with_tp2_and_pp2_match_single_process_reference(tmp_path):
    _check(4, _four_rank_scenarios(), tmp_path)


@pytest.mark.parametrize("overrides, key", [
    (["parallel.tp=3"], "parallel.tp"),  # heads do not split over 3 ranks
    (["parallel.pp=3"], "parallel.pp"),  # 4 layers do not split over 3 stages
    (["parallel.tp=2", "model.ffn_hidden_size=353"], "parallel.tp"),
    (["parallel.pp=2", "model.tie_embeddings=true"], "model.tie_embeddings"),
    (["parallel.tp=2", "focusft.enabled=true"], "focusft.enabled"),
    (["parallel.pp=2", "focusft.enabled=true"], "focusft.enabled"),
])
def test_unsupported_layouts_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(ROOT / "recipes" / "tiny.yaml", overrides)
