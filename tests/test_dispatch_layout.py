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
    from distca.parallel.pingpong import split_nano_batches, task_pairs

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
