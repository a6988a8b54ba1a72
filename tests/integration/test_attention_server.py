"""Dedicated attention servers and the receive-buffer budget (gloo, CPU).

Two workers plus one dedicated server (3 ranks): the server holds no tokens and no weights yet
computes a share of every layer's attention; loss and gradients of the workers must equal the
single-process colocated reference (fp32, relative error < 1e-5), ping-pong on and off.
"""

from __future__ import annotations

import numpy as np
import pytest
from distca.parallel.planning import plan_within_budget, receive_bytes
from distca.scheduler import ModelShape, plan_step
from distca.scheduler.documents import documents_from_batch
from runtime_harness import assert_parity, run_ranks, skewed_batch

T = 64
DOCS = [90, 1, 17, 1, 12]  # a document longer than a worker's share, one-token documents
SKEWED = [64, 1, 5, 8, 3, 9, 1, 20, 7]
DEDICATED = ["parallel.dp=2", "trainer.seed=7", "cad.min_shard_tokens=4", "cad.enabled=true",
             "cad.server_mode=dedicated", "cad.num_dedicated_servers=1"]
SHAPE = ModelShape(h_q=4, h_kv=2, head_dim=32, bytes_per_elem=4)  # the tiny preset, fp32


SCENARIOS = {
    "pingpong_eps0.1_gated_sinks": ["cad.tolerance=0.1", "cad.ping_pong=true",
                                    "model.gated_attention=true", "model.learnable_sinks=true"],
    "blocking_eps0": ["cad.tolerance=0", "cad.ping_pong=false"],
}


@pytest.mark.parametrize("name", [
    "pingpong_eps0.1_gated_sinks",
    pytest.param("blocking_eps0", marks=pytest.mark.slow),
])
def test_two_workers_and_a_dedicated_server_match_reference(tmp_path, name):
    batches = [skewed_batch(2, T, DOCS, seed=1)]
    if name == "blocking_eps0":  # the slow variant adds a second micro-batch
        batches.append(skewed_batch(2, T, SKEWED, seed=2))
    scenarios = [(name, DEDICATED + SCENARIOS[name], batches)]
    tolerance = 0.1 if "eps0.1" in name else 0.0
    for batch in batches:  # the server really gets work under these plans
        docs = documents_from_batch(batch.doc_lengths, None, None)
        plan = plan_step(docs, num_workers=2, tokens_per_worker=T, num_servers=3,
                         tolerance=tolerance, min_shard_tokens=4, model=SHAPE)
        assert plan.server_cost[2] > 0
    run_ranks(3, scenarios, tmp_path)
    run_ranks(1, scenarios, tmp_path, reference=True)
    assert_parity(tmp_path, scenarios, world=2)


def _skewed_docs(workers: int, tokens: int):
    return documents_from_batch(np.array([tokens] + [64] * ((workers - 1) * tokens // 64)),
                                None, None)


def test_plan_over_budget_is_replanned_with_larger_tolerance():
    docs = _skewed_docs(4, 1024)
    free, tol_free, need_free = plan_within_budget(docs, 4, 1024, 4, 0.0, 32, SHAPE, float("inf"))
    assert tol_free == 0.0 and free is not None
    floor = plan_step(docs, num_workers=4, tokens_per_worker=1024, tolerance=1e9,
                      min_shard_tokens=32, model=SHAPE)
    assert floor.bytes_moved == 0  # a plan that moves nothing: the smallest buffers
    need_floor = int(receive_bytes(floor).max())
    assert need_floor < need_free
    budget = (need_floor + need_free) / 2
    plan, used, need = plan_within_budget(docs, 4, 1024, 4, 0.0, 32, SHAPE, budget)
    assert plan is not None and used > 0.0
    assert need <= budget and int(receive_bytes(plan).max()) == need
    # still balanced as well as the larger tolerance allows, nothing dropped
    assert plan.imbalance <= 1 + used + 1e-9
    assert plan.server_cost.sum() == free.server_cost.sum()


def test_budget_below_the_colocated_buffers_fails_clearly():
    docs = _skewed_docs(2, 512)
    plan, _, need = plan_within_budget(docs, 2, 512, 2, 0.1, 32, SHAPE, 1024)
    assert plan is None and need > 1024


@pytest.mark.parametrize("value", ["0", "-1", "inf"])
def test_budget_config_is_validated(value):
    from runtime_harness import ROOT

    from distca.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="cad.buffer_budget_mb"):
        load_config(ROOT / "recipes" / "tiny.yaml", [f"cad.buffer_budget_mb={value}"])
