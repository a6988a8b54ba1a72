"""Activation recomputation changes no number (fp32, relative error <= 1e-6).

Each scenario runs once without recompute and once per recompute mode on the same ranks, from
the same weights (same seed), on the same micro-batches; losses and every gradient must agree:
colocated, CAD (blocking and token ping-pong, whose staggered halves take the checkpoints
themselves), tp=2 (``full`` shards the kept layer input over TP), pp=2 (the lock-step
pipeline) and FocuSFT (the inner loop's autograd.grad through the checkpoints).
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from runtime_harness import load_result, relative_error, run_ranks, skewed_batch

T = 64
BASE = ["trainer.seed=7", "cad.min_shard_tokens=4", "cad.tolerance=0.1"]


def _batches(dp: int):
    """Two micro-batches over ``dp`` workers of T tokens (a document spanning two workers; with
    ping-pong, worker 1 of the first has nano-batches of 7 and 57 tokens)."""
    return [skewed_batch(dp, T, [50, 1, 10] if dp == 1 else [89, 2, 17, 1, 12], seed=1),
            skewed_batch(dp, T, [40, 1, 5, 8, 3, 7][:4 if dp == 1 else 6], seed=2)]


SP = "parallel.sequence_parallel=true"
VARIANTS = {"selective": ["model.recompute=selective"], "full": ["model.recompute=full"],
            "sp": [SP], "sp_full": [SP, "model.recompute=full"]}


def _scenarios(layouts: dict[str, list[str]], modes: tuple[str, ...]):
    out = []
    for name, layout in layouts.items():
        dp = int([o for o in layout if o.startswith("parallel.dp=")][-1].split("=")[1])
        out += [(f"{name}_{mode}", BASE + layout + VARIANTS.get(mode, []), _batches(dp))
                for mode in ("none", *modes)]
    return out


def _check(layouts, modes, world: int, out) -> None:
    run_ranks(world, _scenarios(layouts, modes), out)
    for name in layouts:
        for rank in range(world):
            want = load_result(out, f"{name}_none", rank)
            for mode in modes:
                got = load_result(out, f"{name}_{mode}", rank)
                assert abs(got["loss"] - want["loss"]) <= 1e-6 * abs(want["loss"]), (name, mode)
                assert got["grads"].keys() == want["grads"].keys()
                for param, grad in want["grads"].items():
                    err = relative_error(got["grads"][param], grad)
                    assert err <= 1e-6, f"{name} {mode} rank {rank} {param}: {err:.2e}"


CAD = ["parallel.dp=2", "cad.enabled=true"]
PINGPONG = {"cad_pingpong": CAD + ["cad.ping_pong=true", "model.learnable_sinks=true"],
            "tp2": ["parallel.tp=2", "parallel.dp=1", "cad.enabled=true",
                    "model.gated_attention=true"]}
MORE = {"colocated": ["parallel.dp=2", "cad.enabled=false"],
        "cad_blocking": CAD + ["cad.ping_pong=false"],
        "pp2": ["parallel.pp=2", "parallel.dp=1", "cad.enabled=true", "cad.ping_pong=true"],
        "pp2_colocated": ["parallel.pp=2", "parallel.dp=1", "cad.enabled=false"]}


def test_recompute_matches_no_recompute_pingpong_and_tp2(tmp_path):
    _check(PINGPONG, ("full",), 2, tmp_path)


def test_sequence_parallel_matches_tp2_without_it(tmp_path):
    """tp=2 with sequence parallelism (and full recompute on top) equals plain tp=2."""
    _check({"tp2_blocking": ["parallel.tp=2", "parallel.dp=1", "cad.enabled=true",
                             "cad.ping_pong=false", "model.gated_attention=true"]},
           ("sp", "sp_full"), 2, tmp_path)


@pytest.mark.slow
def test_sequence_parallel_matches_with_pp2(tmp_path):
    """tp=2 × pp=2 (4 ranks), colocated 1F1B and CAD lock-step: stage links carry 1/tp rows."""
    _check({"tp2pp2_colocated": ["parallel.tp=2", "parallel.pp=2", "parallel.dp=1",
                                 "cad.enabled=false"],
            "tp2pp2_lockstep": ["parallel.tp=2", "parallel.pp=2", "parallel.dp=1",
                                "cad.enabled=true", "cad.ping_pong=false"],
            "tp2pp2_lockstep_pingpong": ["parallel.tp=2", "parallel.pp=2", "parallel.dp=1",
                                         "cad.enabled=true", "cad.ping_pong=true"]},
           ("sp", "sp_full"), 4, tmp_path)


def test_sequence_parallel_in_the_staggered_path(tmp_path):
    """tp=2 × dp=2 with token ping-pong: each nano-batch is sharded over the TP ranks on its
    own (padded: the nano-batches' lengths are odd), with sinks and full recompute on top."""
    _check({"tp2dp2_pingpong": ["parallel.tp=2", "parallel.dp=2", "cad.enabled=true",
                                "cad.ping_pong=true", "model.learnable_sinks=true"]},
           ("sp", "sp_full"), 4, tmp_path)


@pytest.mark.slow
def test_recompute_matches_no_recompute_every_layout(tmp_path):
    _check({**PINGPONG, **MORE}, ("selective", "full"), 2, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("dedicated", [False, True], ids=["two_ranks", "dedicated_server"])
def test_focusft_recompute_matches_no_recompute(tmp_path, dedicated):
    from test_focusft_distributed import DEDICATED, _rank_main

    from distca.profile.comm import free_port

    world = 3 if dedicated else 2
    extra = ["focusft.layer_fraction=0.75", *DEDICATED] if dedicated else []
    results = {}
    for mode in ("none", "full", "selective"):
        out = tmp_path / mode
        out.mkdir()
        mp.spawn(_rank_main, args=(world, free_port(), str(out),
                                   extra + [f"model.recompute={mode}"]),
                 nprocs=world, join=True)
        results[mode] = [torch.load(out / f"{rank}.pt") for rank in range(2)]
    for mode in ("full", "selective"):
        for got, want in zip(results[mode], results["none"]):
            for key, value in want["stats"].items():
                assert abs(got["stats"][key] - value) <= 1e-6 * max(abs(value), 1e-6), key
            for param, grad in want["grads"].items():
                assert relative_error(got["grads"][param], grad) <= 1e-6, (mode, param)
            for a, b in zip(got["fast"], want["fast"]):
                assert relative_error(a, b) <= 1e-6


@pytest.mark.slow
def test_recompute_with_a_dedicated_server(tmp_path):
    """Two workers and a dedicated attention server (3 ranks): the server runs its
    attention-only layers unchanged and its exchanges still line up with the recomputing
    workers' (a mismatch would hang or fail the step)."""
    _check({"dedicated": CAD + ["cad.ping_pong=true", "cad.server_mode=dedicated",
                                "cad.num_dedicated_servers=1"]}, ("selective", "full"), 3,
           tmp_path)
