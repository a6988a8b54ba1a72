"""``model.init_from`` in every layout: each worker reads the whole pretrained model and keeps
its shard, so a multi-rank run from SmolLM2-135M-Instruct (9 query / 3 kv heads, 30 layers,
tied embeddings) computes the step-1 loss of a single-process run from the same source on the
same batch (fp32, 1e-5) and, with the dedicated server, its gradients (1e-4), and that single-process loss is transformers' own on the same
documents (1e-4): the weights really are SmolLM2's.

Layouts: dp=2 x tp=3 x pp=2 (every rank a worker and an in-place attention server; the tied
embedding is a copy on each end of the pipeline), and dp=2 with one dedicated attention server
(which the runtime supports only with tp = pp = 1).
"""

from __future__ import annotations

import pytest
from runtime_harness import assert_parity, load_reference, run_ranks, skewed_batch
from smollm2 import smollm2_hf_dir
from train_helpers import transformers_loss

pytestmark = pytest.mark.slow

T = 64  # tokens per data-parallel worker: 128 in all


def _scenarios(source, layout):
    batches = [skewed_batch(2, T, [70, 1, 20, 9, 16], seed=3, vocab=49152)]
    base = [f"model.init_from={source}", "parallel.dp=2", "cad.enabled=true",
            "cad.min_shard_tokens=4", "cad.tolerance=0", "cad.ping_pong=false"]
    return [("init_from", base + layout, batches)]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return smollm2_hf_dir(tmp_path_factory.mktemp("smollm2"))


@pytest.mark.parametrize("world, layout", [
    (12, ["parallel.tp=3", "parallel.pp=2"]),
    (3, ["cad.server_mode=dedicated", "cad.num_dedicated_servers=1"]),
], ids=["dp2_tp3_pp2", "dp2_one_dedicated_server"])
def test_run_from_smollm2_matches_single_process(source, world, layout, tmp_path):
    scenarios = _scenarios(source, layout)
    grads = world <= 3  # 12 ranks each gathering SmolLM2's gradients would not fit in 24 GB
    run_ranks(world, scenarios, tmp_path, grads=grads)
    run_ranks(1, scenarios, tmp_path, reference=True, grads=grads)
    workers = world - 1 if "cad.server_mode=dedicated" in layout else world
    # 30 layers of fp32 sums in other orders (TP partial sums, the gradients' all-reduce):
    # the deepest gradients differ from the reference by ~1e-5, the loss by far less
    assert_parity(tmp_path, scenarios, workers, grad_tol=1e-4)
    name, overrides, batches = scenarios[0]
    ref = load_reference(tmp_path, overrides, batches)["loss"]
    expected = transformers_loss(source, batches)
    assert abs(ref - expected) <= 1e-4 * expected

