"""Tensor- and pipeline-parallel parity with a single-process colocated reference (gloo, CPU).
Tied embeddings over pipeline stages included.

For the same weights and global batch, the loss and every parameter gradient of a TP=2 or PP=2
run (TP shards and PP stages gathered into the full model) equal the reference's (fp32,
relative error < 1e-5), with disaggregated attention on, ping-pong on and off, gated attention
and learnable sinks (sinks shard with their heads). PP with disaggregated attention runs the
lock-step schedule (ping-pong on or off), where ranks in the pipeline bubble serve the other
stage's attention; PP with colocated attention runs 1F1B. PP runs also check ``eval_loss``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attention_reference import dense_attention
from distca.parallel.dispatch import merge_partials
from distca.parallel.lockstep import nano_job_layouts, split_placement, tick_documents
from distca.parallel.nanobatch import document_cuts
from distca.scheduler import ModelShape, plan_step
from distca.scheduler.documents import documents_from_batch
from runtime_harness import ROOT, assert_parity, load_result, run_ranks, skewed_batch

from distca.attention import core_attention
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
        ("pp2_blocking", pp2 + ["cad.tolerance=0", "cad.ping_pong=false"], three),
        # one plan per job: each micro-batch's attention spread alone over both stages' ranks
        ("pp2_job_plans", pp2 + ["cad.tolerance=0", "cad.ping_pong=true",
                                 "cad.pipeline_plan=job"], three),
        ("pp2_colocated", [o for o in pp2 if o != "cad.enabled=true"] + ["cad.enabled=false"],
         three),  # the 1F1B schedule
        # tied embeddings: a copy on each end of the pipeline, gradients summed over both
        ("pp2_tied", pp2 + ["model.tie_embeddings=true", "cad.tolerance=0",
                            "cad.ping_pong=false"], three),
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
        ("dp2_pp2_pingpong_eps0", BASE + ["parallel.dp=2", "parallel.pp=2", "cad.tolerance=0",
                                          "cad.ping_pong=true"] + GATED_SINKS, batches),
        ("dp2_pp2_blocking", BASE + ["parallel.dp=2", "parallel.pp=2", "cad.tolerance=0.1",
                                     "cad.ping_pong=false"] + GATED_SINKS, batches),
        ("dp2_pp2_job_plans", BASE + ["parallel.dp=2", "parallel.pp=2", "cad.tolerance=0",
                                      "cad.ping_pong=false", "cad.pipeline_plan=job"]
         + GATED_SINKS, batches),
    ]


def _check(world: int, scenarios, out) -> None:
    run_ranks(world, scenarios, out)
    run_ranks(1, scenarios, out, reference=True)
    assert_parity(out, scenarios, world)
    for name, overrides, _ in scenarios:
        if {"parallel.pp=2", "cad.enabled=true"} <= set(overrides):  # the lock-step schedule:
            for rank in range(world):  # every rank's stage idles in some tick; it served then
                assert load_result(out, name, rank)["bubble_served_pairs"] > 0, (name, rank)


def test_tp2_and_pp2_match_single_process_reference(tmp_path):
    _check(2, _two_rank_scenarios(), tmp_path)


@pytest.mark.slow
def test_dp2_with_tp2_and_pp2_match_single_process_reference(tmp_path):
    _check(4, _four_rank_scenarios(), tmp_path)


def _covered(placement, tokens: int) -> np.ndarray:
    """(tokens, tokens) int: how many tasks over all servers score each (query, key) pair."""
    seen = np.zeros((tokens, tokens), dtype=np.int64)
    for q_tokens, kv_tokens, q_ranges, kv_ranges, causal in placement:
        for (qa, qb), (ka, kb), c in zip(q_ranges, kv_ranges, causal):
            for row, q in enumerate(q_tokens[qa:qb]):
                keys = kv_tokens[ka:kb]
                if c:  # bottom-right aligned
                    keys = keys[:len(keys) - (qb - qa) + row + 1]
                seen[q, keys] += 1
    return seen


def _random_tick(rng: np.random.Generator, dp: int, stages: int, tokens: int):
    """A forward tick of random jobs planned over ``dp * stages`` servers: the jobs' stages,
    their documents and, per job, its tasks per exchange-group rank (job-local tokens)."""
    jobs, docs = [], []
    for stage in sorted(rng.choice(stages, size=int(rng.integers(1, stages + 1)), replace=False)):
        lengths = []
        while sum(lengths) < dp * tokens - 1 and rng.random() < 0.85:
            lengths.append(int(rng.integers(1, dp * tokens - sum(lengths))))
        lengths = lengths or [1]
        jobs.append(int(stage))
        docs.append(documents_from_batch(np.array(lengths)))
    tick = tick_documents(docs, dp * tokens)
    plan = plan_step(tick.documents, len(jobs) * dp, tokens,
                     num_servers=dp * stages, tolerance=float(rng.choice([0.0, 0.1])),
                     min_shard_tokens=2, model=ModelShape(h_q=2, h_kv=1, head_dim=4))
    servers = [plan.server_inputs(s) for s in range(plan.num_servers)]
    active = [s * dp + d for s in jobs for d in range(dp)]
    return jobs, docs, split_placement(servers, tick, active, dp * stages)


@pytest.mark.parametrize("seed", range(4))
def test_tick_plan_split_covers_each_job_exactly(seed):
    """Jobs of one tick planned together over more servers than workers: each job's tasks,
    split back out, score every causal pair of its documents exactly once and no padding."""
    dp, stages, tokens = 2, 3, 24
    _, docs, placements = _random_tick(np.random.default_rng(seed), dp, stages, tokens)
    for batch, placement in zip(docs, placements):
        np.testing.assert_array_equal(_covered(placement, dp * tokens),
                                      _causal_pairs(batch.doc_length, dp * tokens))


def _causal_pairs(lengths, tokens: int) -> np.ndarray:
    """(tokens, tokens) int: 1 where query and key share a document and key <= query."""
    want = np.zeros((tokens, tokens), dtype=np.int64)
    start = 0
    for n in lengths:
        want[start:start + n, start:start + n] = np.tril(np.ones((n, n), dtype=np.int64))
        start += n
    return want


@pytest.mark.parametrize("seed", range(6))
def test_nano_job_layouts_reproduce_each_jobs_attention(seed):
    """Every rank's two nano-batch layouts of a tick's jobs, exchanged in one process (workers
    send q/k/v rows, servers run their tasks, workers merge the partial rows by LSE), give each
    job's causal attention within its documents (fp64). This is the ping-pong lock-step's data
    path with dp = 2 workers per job, without processes: documents longer than a worker's
    share, one-token documents, servers on idle stages."""
    rng = np.random.default_rng(seed)
    dp, stages, tokens, hq, hkv, d = 2, 3, 24, 4, 2, 8
    jobs, docs, placements = _random_tick(rng, dp, stages, tokens)
    gen = torch.Generator().manual_seed(seed)
    for stage, batch, placement in zip(jobs, docs, placements):
        workers = [stage * dp + w for w in range(dp)]
        cuts = document_cuts(batch, dp, tokens)
        views = [nano_job_layouts(placement, cuts, workers, tokens, g, torch.device("cpu"))
                 for g in range(dp * stages)]
        q = torch.randn(dp * tokens, hq, d, generator=gen, dtype=torch.float64)
        k, v = (torch.randn(dp * tokens, hkv, d, generator=gen, dtype=torch.float64)
                for _ in range(2))
        got = torch.zeros_like(q)
        for i in (0, 1):
            mine = {}  # worker's nano-batch tensors: its q rows, kv rows (first rows + own)
            for w, g in enumerate(workers):
                rows = views[g][1]
                kv_rows = rows[0] if i == 0 else torch.cat(rows)
                local = slice(w * tokens, (w + 1) * tokens)
                mine[g] = (q[local][rows[i]], k[local][kv_rows], v[local][kv_rows])
            partials = {g: ([], []) for g in workers}
            for server, (layouts, *_) in enumerate(views):
                lay = layouts[i]
                sent = [[], [], []]
                for w, g in enumerate(workers):
                    src = views[g][0][i]
                    assert src.send_q[server].numel() == lay.recv_q[w]
                    assert src.send_kv[server].numel() == lay.recv_kv[w]
                    wq, wk, wv = mine[g]
                    sent[0].append(wq[src.send_q[server]])
                    sent[1].append(wk[src.send_kv[server]])
                    sent[2].append(wv[src.send_kv[server]])
                sq, sk, sv = (torch.cat(x) for x in sent)
                if lay.tasks is None:
                    assert sq.shape[0] == 0
                    continue
                out, lse = core_attention(sq, sk, sv, *lay.tasks, softmax_scale=d ** -0.5,
                                          backend="torch")
                for g, o, s in zip(workers, out.split(lay.recv_q), lse.split(lay.recv_q)):
                    partials[g][0].append(o)
                    partials[g][1].append(s)
            for w, g in enumerate(workers):
                rows, send_q = views[g][1][i], views[g][0][i].send_q
                out_r = torch.cat(partials[g][0]) if partials[g][0] else q.new_zeros(0, hq, d)
                lse_r = torch.cat(partials[g][1]) if partials[g][1] else q.new_zeros(0, hq)
                merged, _ = merge_partials(out_r, lse_r.double(), torch.cat(send_q), rows.numel())
                got[w * tokens + rows] = merged.double()
        n = int(batch.num_tokens)
        mask = torch.as_tensor(_causal_pairs(batch.doc_length, dp * tokens)[:n, :n], dtype=torch.bool)
        want, _ = dense_attention(q[:n], k[:n], v[:n], mask, softmax_scale=d ** -0.5)
        # merge_partials weighs partial rows in fp32: each output is a convex combination of
        # v rows with weights off by a few fp32 ulps, so its error is within 16 eps32 * max|v|.
        atol = 16 * torch.finfo(torch.float32).eps * float(v.abs().max())
        torch.testing.assert_close(got[:n], want, rtol=0, atol=atol)
        assert not got[n:].any()  # padding rows get no attention


@pytest.mark.parametrize("overrides, key", [
    (["parallel.tp=3"], "parallel.tp"),  # heads do not split over 3 ranks
    (["parallel.pp=3"], "parallel.pp"),  # 4 layers do not split over 3 stages
    (["parallel.tp=2", "model.ffn_hidden_size=353"], "parallel.tp"),
])
def test_unsupported_layouts_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(ROOT / "recipes" / "tiny.yaml", overrides)
