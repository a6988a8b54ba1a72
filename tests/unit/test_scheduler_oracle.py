"""Dense references for the scheduler tests: the document mask and task coverage, token by token.

Only for small batches: both build (N, N) matrices over the packed stream.
"""

from __future__ import annotations

import numpy as np


def allowed_mask(doc_lengths, turn_lengths=None, turn_is_context=None, num_tokens=None):
    """(N, N) bool: query row i may attend key column j (design §2), padding rows/columns empty."""
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    n = int(num_tokens if num_tokens is not None else lengths.sum())
    if turn_lengths is None:
        turn_lengths, turn_is_context = lengths, np.zeros(lengths.size, dtype=bool)
    doc_of = np.full(n, -1)
    turn_of = np.full(n, -1)
    used = int(lengths.sum())
    doc_of[:used] = np.repeat(np.arange(lengths.size), lengths)
    turn_of[:used] = np.repeat(np.arange(len(turn_lengths)), turn_lengths)
    context = np.asarray(turn_is_context, dtype=bool)
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    same_doc = (doc_of[:, None] == doc_of[None, :]) & (doc_of[:, None] >= 0)
    earlier_turn = turn_of[None, :] < turn_of[:, None]
    same_turn = turn_of[None, :] == turn_of[:, None]
    row_context = np.where(turn_of >= 0, context[np.maximum(turn_of, 0)], False)[:, None]
    return same_doc & (earlier_turn | (same_turn & (row_context | (j <= i))))


def coverage(tasks, num_tokens):
    """(N, N) int: how many tasks cover each (query, key) pair (causal aligned bottom-right)."""
    count = np.zeros((num_tokens, num_tokens), dtype=np.int64)
    for t in tasks:
        q = np.arange(t["q_start"], t["q_end"])[:, None]
        k = np.arange(t["kv_start"], t["kv_end"])[None, :]
        visible = np.ones((q.size, k.size), dtype=bool)
        if t["causal"]:
            visible = k <= t["kv_end"] - t["q_end"] + q
        count[t["q_start"]:t["q_end"], t["kv_start"]:t["kv_end"]] += visible
    return count


def test_oracle_mask_on_a_hand_checked_document():
    # One document: context turn [0, 2), response turn [2, 4); then a causal document [4, 6).
    mask = allowed_mask([4, 2], [2, 2, 2], [True, False, False], num_tokens=7)
    expected = np.array([
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0],
    ], dtype=bool)
    np.testing.assert_array_equal(mask, expected)


def test_oracle_coverage_of_a_causal_task_is_bottom_right():
    task = np.array([(0, 0, 2, 4, 0, 4, True)], dtype=[
        ("server", "i8"), ("doc", "i8"), ("q_start", "i8"), ("q_end", "i8"),
        ("kv_start", "i8"), ("kv_end", "i8"), ("causal", "?")])
    count = coverage(task, 4)
    np.testing.assert_array_equal(count[2:], [[1, 1, 1, 0], [1, 1, 1, 1]])
    assert count[:2].sum() == 0
