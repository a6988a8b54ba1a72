"""Sink telemetry against the dense float64 attention matrix."""

import math

import pytest
import torch

from distca.attention import core_attention, sink_rate, sink_telemetry
from distca.attention.tasks import multiturn_tasks, task_mask

DOCS = [[(7, True), (5, False), (9, True), (6, False)], [(1, False)], [(12, True), (10, False)]]


def dense_probs(q, k, mask, sinks):
    """(H, Nq, Nk + 1) float64 attention weights, the sink in the last column."""
    scores = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    sink_col = sinks.view(-1, 1, 1).expand(-1, q.shape[0], 1)
    return torch.softmax(torch.cat([scores, sink_col], dim=2), dim=2)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_telemetry_matches_dense_weights(backend, request):
    if backend == "cpp":
        request.getfixturevalue("cpp_extension")
    tasks = multiturn_tasks(DOCS)
    n, heads = tasks.num_q, 3
    gen = torch.Generator().manual_seed(7)
    q, k = (torch.randn(n, heads, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    k[[0, 27, 28]] *= 4.0  # make first tokens stand out a little
    sinks = torch.tensor([-3.0, 0.5, 2.0], dtype=torch.float64)
    starts = torch.tensor([0] * 27 + [27] + [28] * 22)
    is_context = torch.cat([torch.full((length,), ctx) for doc in DOCS for length, ctx in doc])
    loss_mask = ~is_context

    probs = dense_probs(q, k, task_mask(tasks), sinks)
    want_sink = probs[..., -1].mean(1)
    want_first = probs[:, torch.arange(n), starts].mean(1)
    want_ctx = (probs[..., :-1] * is_context.double()).sum(2)[:, loss_mask].mean(1)
    want_resp = (probs[..., :-1] * loss_mask.double()).sum(2)[:, loss_mask].mean(1)

    qf, kf, sf = q.float(), k.float(), sinks.float()
    _, lse = core_attention(qf, kf, kf, tasks, None, None, sinks=sf, backend=backend)
    got = sink_telemetry(qf, kf, lse, tasks, starts, sinks=sf, loss_mask=loss_mask,
                         sample_rows=n, backend=backend)
    for name, have, want in [("sink", got.sink_mass, want_sink),
                             ("first", got.first_token_mass, want_first),
                             ("sampled", got.sampled_first_token_mass, want_first),
                             ("context", got.context_mass, want_ctx),
                             ("response", got.response_mass, want_resp)]:
        assert torch.allclose(have.double(), want, rtol=1e-5, atol=1e-7), (name, have, want)
    assert torch.equal(got.has_sink, want_first > 0.3)
    assert got.context_mass.min() > 0.1 and got.response_mass.min() > 0.1


def test_sink_rate_counts_layer_head_pairs():
    tasks = multiturn_tasks([[(40, False)]])
    q = torch.zeros(40, 2, 8)
    k = torch.zeros(40, 2, 8)
    q[:, 0, 0], k[0, 0, 0] = 1.0, 30.0  # head 0 puts nearly all mass on token 0
    _, lse = core_attention(q, k, k, tasks, None, None)
    layer = sink_telemetry(q, k, lse, tasks, torch.zeros(40, dtype=torch.long), sample_rows=16,
                           generator=torch.Generator().manual_seed(0))
    assert layer.has_sink.tolist() == [True, False]
    assert sink_rate([layer, layer]) == 50.0


def test_training_sink_mass_is_the_sink_share_of_the_softmax():
    """The model's running sink mass (what `distca train` logs) equals the dense softmax's sink
    column: ~1 for a dominant sink, ~0 for a negligible one, never a constant 1/2."""
    from types import SimpleNamespace

    from megatron.core.transformer.transformer_config import TransformerConfig
    from test_attention_core import fresh_seed

    from distca.model.core_attention import DistcaCoreAttention, SinkMassSums

    heads, dim, rows = 3, 8, 40
    config = TransformerConfig(num_layers=1, hidden_size=heads * dim, num_attention_heads=heads,
                               kv_channels=dim, use_cpu_initialization=True)
    runtime = SimpleNamespace(telemetry=SinkMassSums())
    layer = DistcaCoreAttention(config, layer_number=1, runtime=runtime, learnable_sinks=True,
                                pg_collection=SimpleNamespace(tp=SimpleNamespace(size=lambda: 1)))
    gen = torch.Generator().manual_seed(fresh_seed())
    lse = torch.randn(rows, heads, generator=gen) + 4.0
    lse[3] = float("-inf")  # a row in no task: not counted
    with torch.no_grad():
        layer.sinks.copy_(torch.tensor([-20.0, 0.0, 20.0]) + 4.0)
    layer.finish(torch.randn(rows, heads, dim, generator=gen), lse)
    live = torch.isfinite(lse)
    want = torch.sigmoid(layer.sinks.detach().double() - lse.double())[live].sum().item()
    got = runtime.telemetry.mass_sum[1]
    assert runtime.telemetry.rows[1] == int(live.sum())
    assert got == pytest.approx(want, rel=1e-5)
