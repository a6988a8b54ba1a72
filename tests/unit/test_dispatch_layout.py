"""Dispatch layout and LSE merge against simple oracles (single process, no collectives)."""

from __future__ import annotations

import numpy as np
import torch
from distca.parallel.dispatch import merge_partials
from distca.parallel.layout import _union_ids, build_layout, server_inputs_from_tasks


def test_union_ids_matches_set_union():
    rng = np.random.default_rng(0)
    for _ in range(50):
        starts = rng.integers(0, 100, 6)
        ends = starts + rng.integers(0, 20, 6)
        expected = sorted({t for a, b in zip(starts, ends) for t in range(a, b)})
        assert _union_ids(starts, ends).tolist() == expected


def test_layout_sends_each_worker_its_slice_of_every_server_buffer():
    T, workers = 8, 3
    # Server 0 takes a document spanning workers 0-1 and a kv range shared by two tasks;
    # server 2 takes a one-token task; server 1 has nothing.
    servers = [
        server_inputs_from_tasks([4, 10], [10, 12], [0, 0], [10, 12], [True, True]),
        server_inputs_from_tasks([], [], [], [], []),
        server_inputs_from_tasks([23], [24], [20], [24], [True]),
    ]
    q_tokens, kv_tokens, q_ranges, kv_ranges, _ = servers[0]
    assert q_tokens.tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert kv_tokens.tolist() == list(range(12))  # kv 0..9 sent once, not twice
    assert q_ranges.tolist() == [[0, 6], [6, 8]] and kv_ranges.tolist() == [[0, 10], [0, 12]]
    layouts = [build_layout(servers, r, workers, T, workers, [0, 1, 2]) for r in range(workers)]
    for s, (qt, kt, *_rest) in enumerate(servers):
        sent_q = np.concatenate([lay.send_q_idx[s].numpy() + r * T for r, lay in enumerate(layouts)])
        sent_kv = np.concatenate([lay.send_kv_idx[s].numpy() + r * T
                                  for r, lay in enumerate(layouts)])
        assert sent_q.tolist() == qt.tolist() and sent_kv.tolist() == kt.tolist()
        assert layouts[s].recv_q_counts == [lay.send_q_idx[s].numel() for lay in layouts]
        assert layouts[s].recv_kv_counts == [lay.send_kv_idx[s].numel() for lay in layouts]
    assert layouts[1].q_ranges.shape == (0, 2)


def test_merge_partials_equals_attention_over_the_union_of_keys():
    torch.manual_seed(0)
    n, h, d, keys = 5, 2, 4, 12
    scores = torch.randn(n, h, keys, dtype=torch.float64)
    values = torch.randn(keys, h, d, dtype=torch.float64)
    split = [range(0, 5), range(5, 9), range(9, 12)]
    # Token 4 gets no partial at all; tokens 0-3 get three each, in shuffled order.
    rows, index = [], []
    for part in split:
        idx = list(part)
        lse = torch.logsumexp(scores[..., idx], -1)
        out = torch.einsum("nhk,khd->nhd", torch.softmax(scores[..., idx], -1), values[idx])
        for t in (3, 0, 2, 1):
            rows.append((out[t], lse[t]))
            index.append(t)
    out_r = torch.stack([r[0] for r in rows])
    lse_r = torch.stack([r[1] for r in rows])
    out, lse = merge_partials(out_r, lse_r, torch.tensor(index), n)
    ref = torch.einsum("nhk,khd->nhd", torch.softmax(scores, -1), values)
    assert torch.allclose(out[:4], ref[:4], atol=1e-12)
    assert torch.allclose(lse[:4].double(), torch.logsumexp(scores, -1)[:4], atol=1e-6)
    assert torch.all(out[4] == 0) and torch.all(torch.isinf(lse[4]))


def test_nano_batch_split_keeps_every_task_once_and_balances_pairs():
    from distca.parallel.pingpong import split_nano_batches
    from distca.scheduler import task_pairs

    rng = np.random.default_rng(3)
    servers = []
    for _ in range(3):
        q_start = rng.integers(0, 200, 7)
        q_len = rng.integers(1, 30, 7)
        kv_len = q_len + rng.integers(0, 40, 7)
        servers.append(server_inputs_from_tasks(q_start, q_start + q_len, q_start + q_len - kv_len,
                                                q_start + q_len, rng.random(7) < 0.5))
    servers.append(server_inputs_from_tasks([], [], [], [], []))

    def tasks(inputs):
        q_tokens, kv_tokens, qr, kr, causal = inputs
        return sorted((int(q_tokens[a]), int(b - a), int(kv_tokens[c]), int(e - c), bool(m))
                      for (a, b), (c, e), m in zip(qr, kr, causal))

    first, second = split_nano_batches(servers)
    for s, inputs in enumerate(servers):
        assert sorted(tasks(first[s]) + tasks(second[s])) == tasks(inputs)
        loads = [task_pairs(np.diff(h[2], axis=1)[:, 0], np.diff(h[3], axis=1)[:, 0], h[4]).sum()
                 for h in (first[s], second[s])]
        biggest = task_pairs(np.diff(inputs[2], axis=1)[:, 0], np.diff(inputs[3], axis=1)[:, 0],
                             inputs[4]).max(initial=0)
        assert abs(loads[0] - loads[1]) <= biggest  # greedy bound


# ---- token nano-batches for ping-pong over the linear layers ---------------------------------

def _random_documents(rng, total: int):
    """Documents with random FocuSFT turns (some context, some causal) filling ``total`` tokens
    at most, with one-token documents and one longer than a worker's share."""
    lengths, turns, context = [], [], []
    room = total
    while room > 0:
        n = int(min(room, rng.choice([1, 2, 7, 30, 90])))
        lengths.append(n)
        at = 0
        while at < n:
            t = int(min(n - at, rng.integers(1, 12)))
            turns.append(t)
            context.append(bool(rng.random() < 0.4))
            at += t
        room -= n + int(rng.integers(0, 3))  # sometimes leave padding between batches' ends
    return np.array(lengths), np.array(turns), np.array(context)


def _visible_pairs(servers) -> list[tuple[int, int]]:
    """Every (query token, key token) score pair of the tasks (bottom-right causal)."""
    pairs = []
    for q_tokens, kv_tokens, q_ranges, kv_ranges, causal in servers:
        for (qa, qb), (ka, kb), c in zip(q_ranges, kv_ranges, causal):
            q_len, kv_len = qb - qa, kb - ka
            for i in range(q_len):
                see = min(kv_len, kv_len - q_len + i + 1) if c else kv_len
                pairs += [(int(q_tokens[qa + i]), int(kv_tokens[ka + j])) for j in range(see)]
    return sorted(pairs)


def test_nano_batch_split_keeps_every_score_pair_and_the_first_is_causally_closed():
    from distca.parallel.nanobatch import document_cuts, split_servers_at_cuts
    from distca.scheduler import ModelShape, plan_step
    from distca.scheduler.documents import documents_from_batch

    rng = np.random.default_rng(5)
    workers, T = 3, 40
    for trial in range(6):
        lengths, turns, context = _random_documents(rng, workers * T)
        if trial % 2:  # plain causal documents
            turns = context = None
        docs = documents_from_batch(lengths, turns, context)
        plan = plan_step(docs, num_workers=workers, tokens_per_worker=T, num_servers=workers,
                         tolerance=0.0, min_shard_tokens=2, model=ModelShape(4, 2, 8, 4))
        servers = [plan.server_inputs(s) for s in range(workers)]
        cuts = document_cuts(docs, workers, T)
        first = np.arange(workers * T) < cuts
        for start, n in zip(docs.doc_start, docs.doc_length):  # a prefix of every document
            member = first[start:start + n]
            assert not np.any(member[1:] & ~member[:-1])
        for ts, tl, c in zip(docs.turn_start, docs.turn_length, docs.turn_is_context):
            if c:  # a context turn is never cut
                assert len(set(first[ts:ts + tl].tolist())) == 1
        a, b = split_servers_at_cuts(servers, cuts)
        assert sorted(_visible_pairs(a) + _visible_pairs(b)) == _visible_pairs(servers)
        assert all(first[q] and first[k] for q, k in _visible_pairs(a))
        assert not any(first[q] for q, _ in _visible_pairs(b))


def test_nano_batch_layouts_index_rows_in_nano_order():
    from distca.parallel.nanobatch import document_cuts, nano_batches
    from distca.scheduler import documents_from_batch

    T, workers = 8, 2
    # a document over both workers (cut at token 4), a one-token one at local 2, padding
    lengths = np.array([10, 1])
    cuts = document_cuts(documents_from_batch(lengths), workers, T)
    assert cuts[:11].tolist() == [4] * 10 + [11]
    servers = [server_inputs_from_tasks([0, 8], [8, 10], [0, 0], [8, 10], [True, True]),
               server_inputs_from_tasks([10], [11], [10], [11], [True])]
    nano = [nano_batches(servers, cuts, r, workers, T, workers) for r in range(workers)]
    assert nano[0].rows[0].tolist() == [0, 1, 2, 3] and nano[0].rows[1].tolist() == [4, 5, 6, 7]
    # worker 1: the one-token document and the padding token after it (local 2, 3) are first;
    # the long document's tail (local 0, 1) and the second half's padding are second
    assert nano[1].rows[0].tolist() == [2, 3] and nano[1].rows[1].tolist() == [0, 1, 4, 5, 6, 7]
    assert torch.cat(nano[1].rows).index_select(0, nano[1].order).tolist() == list(range(T))
    first, second = nano[0].layouts
    assert first.send_q_idx[0].tolist() == [0, 1, 2, 3]  # rows 0..3 of the first nano-batch
    assert second.send_q_idx[0].tolist() == [0, 1, 2, 3]  # rows 4..7, counted in the second
    assert second.send_kv_idx[0].tolist() == list(range(8))  # kv of both, first rows first
    first, second = nano[1].layouts
    assert first.send_q_idx[1].tolist() == [0] and first.send_q_idx[0].numel() == 0
    assert second.send_q_idx[0].tolist() == [0, 1]  # local 0, 1 = second-nano rows 0, 1
    assert second.send_kv_idx[0].tolist() == [2, 3]  # ... = rows 2, 3 after the 2 first rows
    assert second.merge_index.tolist() == [0, 1]
