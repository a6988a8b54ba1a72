"""FocuSFT with tensor and pipeline parallelism equals one process stepping on the whole batch.

For the same weights and global batch, a FocuSFT step at TP=2 (fast adapters sharded like the
MLP, with and without sequence parallelism) or PP=2 (the inner loop through the pipeline) gives
the inner losses, the outer loss and every base-weight gradient (TP shards and PP stages
gathered) of the single-process TP=1/PP=1 colocated reference (fp32, relative error < 1e-5):
so the adapters start from the same draws, take the same clipped SGD steps and act the same.
Pipelines: the adapted layers on the last stage only (the stage below runs once per
micro-batch), or from the middle of the first stage up (the inner loop crosses the stages).
"""

from __future__ import annotations

import pytest
from runtime_harness import (
    load_reference,
    load_result,
    multiturn_docs,
    relative_error,
    run_ranks,
)

from distca.data.chat import pack_conversations

T = 96  # tokens per data-parallel worker
FOCUS = ["trainer.seed=7", "focusft.enabled=true", "focusft.inner_steps=2", "focusft.rank=8",
         "focusft.alpha=16", "focusft.inner_grad_clip=0.02",
         "model.learnable_sinks=true", "model.gated_attention=true"]
CAD = ["cad.enabled=true", "cad.min_shard_tokens=4", "cad.tolerance=0.1"]
LOW = ["focusft.layer_fraction=0.75"]  # layers 1-3 of 4: fast weights on both stages at pp=2


def _batches(num_workers: int, seeds=(3, 4)):
    """Multi-turn conversations, the first one longer than a worker's share."""
    return [pack_conversations(multiturn_docs(seed, [num_workers * T - 20, 1, 5, 8, 3]),
                               num_workers, T) for seed in seeds]


def _check(world: int, scenarios, out) -> None:
    run_ranks(world, scenarios, out)
    run_ranks(1, scenarios, out, reference=True)
    for name, overrides, batches in scenarios:
        ref = load_reference(out, overrides, batches)
        assert ref["inner_loss_1"] < ref["inner_loss_0"], name  # the inner loop adapts
        for rank in range(world):
            got = load_result(out, name, rank)
            for key in ("loss", "inner_loss_0", "inner_loss_1"):
                assert abs(got[key] - ref[key]) <= 1e-5 * abs(ref[key]), (name, rank, key)
            if "cad.enabled=true" in overrides and got["imbalance_before"] > 1.0:
                # the plan really moved attention work
                assert got["imbalance"] < got["imbalance_before"], name
            if "eval_loss" in got:  # the base model's loss: fast weights off
                assert abs(got["eval_loss"] - ref["inner_loss_0"]) <= 1e-5 * ref["inner_loss_0"]
            assert got["grads"].keys() == ref["grads"].keys()
            for param, grad in ref["grads"].items():
                err = relative_error(got["grads"][param], grad)
                assert err < 1e-5, f"{name} rank {rank} {param}: relative error {err:.2e}"


def test_focusft_at_tp2_and_pp2_matches_single_process(tmp_path):
    one = _batches(1)
    _check(2, [
        # fast weights on layers 1-3: the inner loop runs three layers' attention
        ("tp2_sequence_parallel", FOCUS + CAD + LOW + [
            "parallel.dp=1", "parallel.tp=2", "parallel.sequence_parallel=true",
            "cad.ping_pong=false"], one),
        ("pp2_both_stages", FOCUS + CAD + LOW + ["parallel.dp=1", "parallel.pp=2",
                                                 "cad.ping_pong=true"], one),
    ], tmp_path)


@pytest.mark.slow
def test_focusft_at_dp2_with_tp2_and_pp2_matches_single_process(tmp_path):
    """Four ranks: CA-tasks move within each data-parallel group (the conversation spans both
    workers), fast-weight gradients are summed over it; 1F1B-free pipeline with colocated
    attention too."""
    two = _batches(2)
    dp2 = FOCUS + ["parallel.dp=2"]
    _check(4, [
        ("dp2_tp2", dp2 + CAD + ["parallel.tp=2", "cad.ping_pong=true"], two),
        ("dp2_pp2_top_stage", dp2 + CAD + ["parallel.pp=2", "cad.ping_pong=false"], two),
        ("dp2_pp2_both_stages_colocated", dp2 + LOW + ["parallel.pp=2", "cad.enabled=false"],
         two),
    ], tmp_path)
