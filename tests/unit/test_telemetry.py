"""Attention statistics (distca.attention.telemetry) against the dense float64 attention
matrix: GLM multi-turn and causal masks, GQA, learnable sinks, a distributed-style reduction."""

import math

import numpy as np
import pytest
import torch

from distca.attention import AttentionStats, RowSpec, attention_forward
from distca.attention.tasks import causal_document_tasks, multiturn_tasks, task_mask

# documents as turns (length, is_context); the 1-token document has no loss-bearing row
DOCS = [[(7, True), (5, False), (9, True), (6, False)], [(1, True)], [(12, True), (10, False)]]


def dense_probs(q, k, mask, sinks):
    """(Hq, Nq, Nk + 1) float64 attention weights (GQA expanded), the sink in the last column."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    sink_col = sinks.view(-1, 1, 1).expand(-1, q.shape[0], 1)
    return torch.softmax(torch.cat([scores, sink_col], dim=2), dim=2)


def chat_rows():
    """(doc_lengths, has_label, is_context per token) of DOCS packed back to back."""
    lengths = [sum(n for n, _ in doc) for doc in DOCS]
    is_context = torch.cat([torch.full((n,), c) for doc in DOCS for n, c in doc])
    has_label = torch.zeros(sum(lengths), dtype=torch.bool)
    has_label[:-1] = ~is_context[1:]
    has_label[np.cumsum(lengths) - 1] = False  # a document's last row predicts nothing
    return lengths, has_label, is_context


@pytest.mark.parametrize("mask", ["glm", "causal"])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_statistics_match_the_dense_float64_matrix(mask, with_sinks):
    lengths, has_label, is_context = chat_rows()
    tasks = (multiturn_tasks(DOCS) if mask == "glm" else causal_document_tasks(lengths))
    rows = RowSpec.from_documents(lengths, has_label.numpy(), chat=True)
    starts = torch.as_tensor(np.repeat(np.cumsum(lengths) - lengths, lengths))
    assert torch.equal(rows.key_is_context, is_context) and torch.equal(rows.first_key, starts)
    n, hq, hkv, layers = tasks.num_q, 4, 2, 3
    gen = torch.Generator().manual_seed(7)
    sinks = torch.tensor([-3.0, 0.5, 2.0, -1.0], dtype=torch.float64) if with_sinks else None
    stats = AttentionStats(layers, hq, has_sinks=with_sinks)
    want_first, want_ctx, want_sink = [], [], []
    for layer in range(layers):
        q = torch.randn(n, hq, 16, generator=gen, dtype=torch.float64)
        k = torch.randn(n, hkv, 16, generator=gen, dtype=torch.float64)
        k[starts.unique()] *= 1.5 + layer  # first tokens stand out more in higher layers
        probs = dense_probs(q, k, task_mask(tasks),
                            sinks if with_sinks else torch.full((hq,), -torch.inf,
                                                                dtype=torch.float64))
        want_first.append(probs[:, torch.arange(n), starts][:, has_label].mean(1))
        want_ctx.append((probs[..., :-1] * is_context.double()).sum(2)[:, has_label].mean(1))
        want_sink.append(probs[..., -1][:, has_label].mean(1))

        qf, kf = q.float(), k.float()
        _, lse = attention_forward(qf, kf, kf, tasks, None, None)  # key-only L

        def attend(q_, k_, v_):
            return attention_forward(q_, k_, v_, tasks, None, None)

        stats.add(layer, qf, kf, lse, rows, attend, None if sinks is None else sinks.float())

    first, ctx, sink = stats._per_head()
    for name, have, want in [("first", first, want_first), ("context", ctx, want_ctx),
                             ("sink", sink, want_sink)]:
        assert torch.allclose(have, torch.stack(want), rtol=1e-4, atol=1e-6), name
    assert float(stats.sums[0, -1]) == int(has_label.sum())
    summary = stats.summary(eps=0.1)
    want_first = torch.stack(want_first)
    assert summary["first_token_mass"] == pytest.approx(float(want_first.mean()), rel=1e-4)
    assert summary["context_mass"] == pytest.approx(float(torch.stack(want_ctx).mean()),
                                                    rel=1e-4)
    assert summary["per_layer"]["first_token_mass"] == pytest.approx(
        want_first.mean(1).tolist(), rel=1e-4)
    assert summary["sink_rate"] == float((want_first > 0.1).double().mean())
    assert 0 < summary["sink_rate"] < 1  # the threshold separates some heads from others
    assert ("sink_mass" in summary) == with_sinks
    metrics = stats.metrics(eps=0.1)
    assert metrics["first_token_mass_layer2"] == summary["per_layer"]["first_token_mass"][2]


def test_text_rows_count_every_token_and_have_no_context():
    rows = RowSpec.from_documents([3, 2], np.ones(6, bool), chat=False)
    assert rows.first_key.tolist() == [0, 0, 0, 3, 3, 0]
    assert rows.counted.tolist() == [True] * 5 + [False]  # the padding row never counts
    assert rows.key_is_context is None


def test_sums_of_rank_shards_reduce_to_the_whole(single_process_group):
    """Rows split over ranks, each rank adding its own: one all_reduce of the fixed-size sums
    gives the statistics of the whole batch (here both shards in one process, then a one-rank
    all_reduce to exercise the collective)."""
    import torch.distributed as dist

    from distca.hf.local import ensure_single_process_group

    ensure_single_process_group()
    lengths, has_label, _ = chat_rows()
    tasks = multiturn_tasks(DOCS)
    rows = RowSpec.from_documents(lengths, has_label.numpy(), chat=True)
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(tasks.num_q, 2, 8, generator=gen), torch.randn(tasks.num_q, 1, 8,
                                                                      generator=gen)
    _, lse = attention_forward(q, k, k, tasks, None, None)

    def attend(q_, k_, v_):
        return attention_forward(q_, k_, v_, tasks, None, None)

    whole = AttentionStats(1, 2)
    whole.add(0, q, k, lse, rows, attend)
    shards = AttentionStats(1, 2)
    for part in (slice(0, 20), slice(20, None)):
        mine = torch.zeros(tasks.num_q, dtype=torch.bool)
        mine[part] = True
        shard = RowSpec(rows.first_key, rows.counted & mine, rows.key_is_context)
        shards.add(0, q, k, lse, shard, attend)
    shards.all_reduce(dist.group.WORLD)
    assert torch.allclose(shards.sums, whole.sums, rtol=1e-12)
    assert shards.summary()["first_token_mass"] == pytest.approx(
        whole.summary()["first_token_mass"], rel=1e-12)
