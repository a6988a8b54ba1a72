"""The pipeline schedules of the simulator: 1F1B and lock-step ticks, worked out by hand."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from distca.scheduler.baselines import colocated_step
from distca.scheduler.distca_sim import water_fill
from distca.scheduler.pipeline_sim import (
    lockstep_ticks,
    one_f_one_b_order,
    pipeline_seconds,
    shared_finish,
    ticks_seconds,
)
from distca.scheduler.sim_model import (
    FWD_ATTENTION,
    FWD_LINEAR,
    attention_seconds,
    linear_seconds_per_token,
)
from distca.scheduler.simulator import Cluster, Hardware, ModelSpec, simulate_batch

LLAMA_8B = ModelSpec(32, 4096, 32, 8, 14336)


def test_one_f_one_b_order_has_warmup_steady_and_cooldown():
    assert one_f_one_b_order(0, 2, 3) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1),
                                          ("B", 2)]
    assert one_f_one_b_order(1, 2, 3) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2),
                                          ("B", 2)]


@pytest.mark.parametrize("pp, heavy, want", [
    # two layers, micro-batches 0 and 1; per layer linear 3 s (forward 1, backward 2) and, on the
    # heavy micro-batch 0, attention 7 s (forward 2, backward 5).
    # pp=1, one stage of both layers: F0 6, B0 14, F1 2, B1 4 -> 26
    (1, True, 26.0),
    # pp=2, a layer per stage: s0 F0 [0,3]; s1 F0 [3,6]; s0 F1 [3,4]; s1 B0 [6,13]; s1 F1 [13,14];
    # s0 B0 waits for s1 B0: [13,20]; s1 B1 [14,16]; s0 B1 [20,22] -> 22
    (2, True, 22.0),
    (1, False, 12.0),  # F0 2, B0 4, F1 2, B1 4
    (2, False, 9.0),  # (M + pp - 1) ticks of forward 1 + backward 2
])
def test_heavy_micro_batch_stalls_the_1f1b_pipeline_as_worked_by_hand(pp, heavy, want):
    model = ModelSpec(2, 64, 4, 2, 128)
    cluster = Cluster(8 * pp, tp=8, pp=pp, micro_batches=2)
    linear = np.array([[3.0, 3.0]])
    attention = np.array([[7.0 if heavy else 0.0, 0.0]])
    got = colocated_step(linear, attention, np.zeros((1, 2)), model, cluster, Hardware())
    assert got == pytest.approx(want)


def test_the_heavy_micro_batch_costs_more_with_pp():
    # four layers, four micro-batches, per layer linear 3 s (forward 1, backward 2), micro-batch
    # 0 also attention 7 s (forward 2, backward 5).
    # pp=1: uniform 4 × 12 = 48; heavy: 12 + 28 + 3 × 12 = 76.
    # pp=2 (2 layers a stage; uniform f=2, b=4, heavy f=6, b=14): uniform (4+1) × 6 = 30; heavy:
    # s0 F0 [0,6] F1 [6,8]; s1 F0 [6,12] B0 [12,26] F1 [26,28] B1 [28,32]; s0 B0 [26,40]
    # F2 [40,42] B1 [42,46] F3 [46,48]; s1 F2 [42,44] B2 [44,48] F3 [48,50] B3 [50,54];
    # s0 B2 [48,52] B3 [54,58] -> 58.
    model = ModelSpec(4, 64, 4, 2, 128)
    steps = {}
    for pp in (1, 2, 4):
        cluster = Cluster(8 * pp, tp=8, pp=pp, micro_batches=4)
        linear = np.full((1, 4), 3.0)
        steps[pp] = [colocated_step(linear, np.array([[a, 0, 0, 0]]), np.zeros((1, 4)), model,
                                    cluster, Hardware()) for a in (7.0, 0.0)]
    assert steps[1] == pytest.approx([76.0, 48.0])
    assert steps[2] == pytest.approx([58.0, 30.0])
    assert steps[4][1] == pytest.approx((4 + 3) * 3.0)
    ratios = [heavy / uniform for heavy, uniform in steps.values()]
    assert ratios[0] < ratios[1] < ratios[2]  # the heavy micro-batch stalls more stages


def test_processor_sharing_slows_ranks_that_compute_together():
    work = np.array([[[1.0]], [[3.0]]])  # two pipelines of one stage, one forward each
    assert pipeline_seconds(work, np.zeros_like(work)) == pytest.approx(3.0)
    # one core: both at half speed until the first is done at 2 s, then the second alone: 4 s
    assert pipeline_seconds(work, np.zeros_like(work), cores=1.0) == pytest.approx(4.0)
    assert shared_finish(np.array([1.0, 3.0]), cores=1.0) == pytest.approx(4.0)
    assert shared_finish(np.array([1.0, 3.0]), cores=2.0, others=2.0) == pytest.approx(5.0)
    rng = np.random.default_rng(0)
    fwd, bwd = rng.uniform(0.5, 2, (3, 2, 4)), rng.uniform(1, 4, (3, 2, 4))
    assert pipeline_seconds(fwd, bwd, cores=6.0) == pytest.approx(pipeline_seconds(fwd, bwd))


def test_lockstep_ticks_by_hand():
    F, B = "F", "B"
    assert lockstep_ticks(2, 3) == [((F, 0), None), ((F, 1), (F, 0)), (None, (B, 0)),
                                    ((B, 0), (F, 1)), ((F, 2), (B, 1)), ((B, 1), (F, 2)),
                                    (None, (B, 2)), ((B, 2), None)]
    # ranks meet at every tick: the slowest rank of each tick adds up
    assert ticks_seconds(np.array([[1.0, 2.0], [4.0, 3.0]])) == pytest.approx(6.0)


def test_water_fill_levels_linear_work():
    np.testing.assert_allclose(water_fill(np.array([0.0, 2.0, 5.0]), 4.0), [3.0, 1.0, 0.0])
    np.testing.assert_allclose(water_fill(np.array([1.0, 1.0]), 2.0), [1.0, 1.0])


def test_identical_micro_batches_keep_every_ratio_and_cad_gains_nothing():
    t, micro, dp = 16384, 4, 2
    lengths = np.full(dp * micro * 4, t // 4)  # every micro-batch slice: the same 4 documents
    steps = {}
    for pp in (1, 2, 4):
        cluster = Cluster(8 * dp * pp, tp=8, pp=pp, micro_batches=micro)
        steps[pp] = simulate_batch(lengths, LLAMA_8B, cluster, Hardware(), t, cp=(1, 2),
                                   slack=0.0)  # no room to pack micro-batches unevenly
    one = steps[1].seconds
    assert one["distca"] == pytest.approx(one["packing"], rel=1e-9)  # nothing worth moving
    assert one["distca-tick"] == pytest.approx(one["packing"], rel=1e-9)
    assert steps[1].bytes_moved == 0
    # per stage, per layer of a micro-batch slice: forward and backward of its own work
    cluster = Cluster(8 * dp, tp=8, micro_batches=micro)
    own = t * linear_seconds_per_token(LLAMA_8B, cluster, Hardware())
    attention = 4 * attention_seconds((t // 4) * (t // 4 + 1) // 2, t // 4, t // 4, LLAMA_8B,
                                      cluster, Hardware())
    f = own * FWD_LINEAR + attention * FWD_ATTENTION
    b = own * (1 - FWD_LINEAR) + attention * (1 - FWD_ATTENTION)
    for pp in (2, 4):
        s = steps[pp].seconds
        layers = LLAMA_8B.num_layers / pp
        # colocated: the 1F1B step of equal micro-batches, (M + pp - 1) / (M·pp) of pp=1's
        assert s["packing"] == pytest.approx((micro + pp - 1) * (f + b) * layers)
        assert s["packing"] == pytest.approx(one["packing"] * (micro + pp - 1) / (micro * pp))
        for name in ("varlen", "per-doc-cp", "wlb-llm"):
            assert s[name] / s["packing"] == pytest.approx(one[name] / one["packing"])
        # distca gains nothing: its lock-step ticks last as long as their longest operation (a
        # backward next to a forward), and attention spread into the bubble does not make up for
        # it when linear work dominates (16K tokens): it stays above both 1F1B and the ideal of
        # every rank's work spread evenly, and pays dispatch for what the planner moves
        lockstep = sum(max(f if op[0] == "F" else b for op in row if op)
                       for row in lockstep_ticks(pp, micro)) * layers
        assert lockstep > s["packing"]
        for name in ("distca", "distca-tick"):
            assert s[name] > s["packing"]


def test_backwards_stay_where_their_forward_was_planned():
    t, micro, pp = 32768, 4, 4
    # micro-batch 0 holds one 32K document on its first slice; everything else 1K documents
    lengths = np.array([t] + [1024] * ((2 * micro - 1) * t // 1024))
    cluster = Cluster(16 * pp, tp=8, pp=pp, micro_batches=micro)
    step = simulate_batch(lengths, LLAMA_8B, cluster, Hardware(), t, tolerance=0.05, cp=1)
    assert step.imbalance <= 1.05 + 1e-9  # every tick plan reaches the tolerance ...
    # ... but a backward runs on the servers of its forward tick, not balanced with the other
    # operations of its own tick
    assert step.tick_imbalance["forward"] <= 1.05 + 1e-9
    assert step.tick_imbalance["backward"] > 1.2
    # planning each job alone would balance them, but here linear work dominates (1K
    # documents): spreading every job over all stages moves bytes for little attention
    assert step.seconds["distca-job"] > step.seconds["distca"]


def test_job_plans_balance_the_backwards_where_attention_dominates():
    t, micro, pp = 131072, 4, 4
    # every micro-batch: one t-token document on its first slice, 4K documents on its second
    lengths = np.array(([t] + [4096] * (t // 4096)) * micro)
    cluster = Cluster(16 * pp, tp=8, pp=pp, micro_batches=micro)
    step = simulate_batch(lengths, LLAMA_8B, cluster, Hardware(), t, tolerance=0.05, cp=1)
    assert step.tick_imbalance["backward"] > 1.5  # the tick plans leave the backwards unbalanced
    s = step.seconds
    assert s["distca-job"] < 0.8 * s["distca"]  # each job balanced alone: every tick is
    assert s["distca-tick"] < s["distca-job"]  # the ceiling re-balances linear work as well


def test_simulator_modules_import_numpy_only():
    code = ("import sys, distca.scheduler.simulator, distca.scheduler.pipeline_sim; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_rank_pays_the_exchange_latency_in_every_tick_and_layer():
    t, micro = 16384, 3
    lengths = np.full(2 * micro * 4, t // 4)  # nothing worth moving
    cluster = Cluster(16, tp=8, micro_batches=micro)
    base = simulate_batch(lengths, LLAMA_8B, cluster, Hardware(), t, ping_pong=False, cp=1)
    slow = simulate_batch(lengths, LLAMA_8B, cluster, Hardware(exchange_latency_s=1e-3), t,
                          ping_pong=False, cp=1)
    assert slow.seconds["packing"] == base.seconds["packing"]
    # pp=1: a forward and a backward tick per micro-batch, each layer two exchanges
    extra = 2 * micro * LLAMA_8B.num_layers * 2 * 1e-3
    assert slow.seconds["distca"] == pytest.approx(base.seconds["distca"] + extra)


def test_bookkeeping_is_charged_per_token_sent_and_served():
    t, micro = 16384, 3
    lengths = np.full(2 * micro * 4, t // 4)  # nothing worth moving: every rank serves its own
    cluster = Cluster(16, tp=8, micro_batches=micro)
    base = simulate_batch(lengths, LLAMA_8B, cluster, Hardware(), t, ping_pong=False, cp=1)
    busy = simulate_batch(lengths, LLAMA_8B, cluster, Hardware(dispatch_cpu_s_per_token=1e-7), t,
                          ping_pong=False, cp=1)
    assert busy.seconds["packing"] == base.seconds["packing"]
    # per micro-batch and layer each rank sends its t tokens and serves t queries
    extra = micro * LLAMA_8B.num_layers * 2 * t * 1e-7
    for name in ("distca", "distca-tick"):
        assert busy.seconds[name] == pytest.approx(base.seconds[name] + extra)
    # one heavy document spread over the servers: the slowest rank pays at least for its sends
    skewed = np.array([t] + [1024] * (t // 1024))
    cluster = Cluster(16, tp=8, micro_batches=1)
    free = simulate_batch(skewed, LLAMA_8B, cluster, Hardware(), t, cp=1)
    paid = simulate_batch(skewed, LLAMA_8B, cluster, Hardware(dispatch_cpu_s_per_token=1e-7), t,
                          cp=1)
    assert free.bytes_moved > 0
    assert paid.seconds["distca"] > free.seconds["distca"] + LLAMA_8B.num_layers * t * 1e-7


@pytest.mark.parametrize("stages, micro_batches", [(2, 1), (2, 3), (3, 2), (4, 6)])
def test_lockstep_ticks_are_1f1b_in_ticks(stages, micro_batches):
    ticks = lockstep_ticks(stages, micro_batches)
    when = {(op[0], s, op[1]): t for t, row in enumerate(ticks)
            for s, op in enumerate(row) if op is not None}
    assert len(when) == 2 * stages * micro_batches  # each F and B once per stage
    for s in range(stages):
        for i in range(micro_batches):
            assert when[("F", s, i)] < when[("B", s, i)]
            if s > 0:
                assert when[("F", s - 1, i)] < when[("F", s, i)]
                assert when[("B", s, i)] < when[("B", s - 1, i)]
        # at most stages - s micro-batches wait for their backward on stage s (1F1B memory)
        for t in range(len(ticks)):
            live = sum(when[("F", s, i)] <= t < when[("B", s, i)] for i in range(micro_batches))
            assert live <= stages - s
    # equal-length operations: the classic 1F1B makespan
    assert len(ticks) == 2 * (micro_batches + stages - 1)
    assert lockstep_ticks(stages, micro_batches, backward=False) == [
        tuple(("F", t - s) if 0 <= t - s < micro_batches else None for s in range(stages))
        for t in range(micro_batches + stages - 1)]
