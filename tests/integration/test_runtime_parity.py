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


def test_staggered_layers_equal_the_plain_forward_in_one_process():
    """The layer halves of distca.model.staggered compose to megatron's own layer forward: loss
    and every gradient of one process, token nano-batches vs one blocking exchange."""
    import torch
    import torch.distributed as dist
    from distca.parallel.exchange import TokenPingPong
    from distca.parallel.nanobatch import document_cuts, nano_batches
    from megatron.core import parallel_state
    from runtime_harness import ROOT, _randomize_sinks, free_port, relative_error

    from distca.config import load_config
    from distca.model.staggered import stage_forward
    from distca.rank import make_rank

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        cfg = load_config(ROOT / "recipes" / "tiny.yaml",
                          ["parallel.dp=1", "cad.enabled=true", "cad.ping_pong=false",
                           "cad.min_shard_tokens=4", "trainer.seed=5"] + GATED_SINKS)
        engine = make_rank(cfg)
        _randomize_sinks(engine.model)
        batch = skewed_batch(1, 96, [40, 1, 17, 1, 30], seed=3)
        plan = engine.exchanges.plan(batch)
        results = []
        for staggered in (False, True):
            engine.model.zero_grad(set_to_none=True)
            if staggered:
                cuts = document_cuts(batch.documents(), 1, 96)
                nano = nano_batches(plan.servers, cuts, 0, 1, 96, 1)
                assert min(r.numel() for r in nano.rows) > 0
                engine.runtime.set_batch(torch.as_tensor(batch.position_ids()),
                                         TokenPingPong(nano, None))
                labels = torch.as_tensor(batch.labels).view(1, -1)
                mask = labels != -100
                losses = stage_forward(engine.stage, engine.runtime,
                                       torch.as_tensor(batch.tokens).view(1, -1), None,
                                       torch.where(mask, labels, 0))
                loss = (losses.float() * mask).sum()
            else:
                loss = engine.forward(batch, plan)
            loss.backward()
            results.append((float(loss.detach()), {n: q.grad.clone()
                                          for n, q in engine.model.named_parameters()}))
        (plain, plain_grads), (stag, stag_grads) = results
        assert abs(stag - plain) <= 1e-5 * abs(plain)
        for name, grad in plain_grads.items():
            assert relative_error(stag_grads[name], grad) < 1e-5, name
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
