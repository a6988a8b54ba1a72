"""Simulator, length distributions and the cost table."""

from __future__ import annotations

import numpy as np
import pytest
from distca.scheduler import CostTable
from distca.scheduler.distributions import read_lengths, sample_lengths
from distca.scheduler.simulator import SYSTEMS, Cluster, Hardware, ModelSpec, simulate_batch

LLAMA_8B = ModelSpec(32, 4096, 32, 8, 14336)


@pytest.mark.parametrize("distribution", ["pretrain", "prolong"])
def test_sampled_batches_fill_exactly(distribution):
    rng = np.random.default_rng(0)
    lengths = sample_lengths(rng, distribution, 8 * 65536, 131072)
    assert lengths.sum() == 8 * 65536
    assert lengths.min() >= 1 and lengths.max() <= 131072
    assert (lengths > 65536).any()  # long documents are there


def test_prolong_mix_puts_most_tokens_in_long_documents():
    lengths = sample_lengths(np.random.default_rng(1), "prolong", 64 * 131072, 131072)
    long_share = lengths[lengths >= 65536].sum() / lengths.sum()
    assert 0.45 < long_share < 0.8


def test_lengths_file_formats_and_errors(tmp_path):
    lines = tmp_path / "a.txt"
    lines.write_text("5\n\n7\n")
    np.testing.assert_array_equal(read_lengths(lines), [5, 7])
    js = tmp_path / "b.json"
    js.write_text("[3, 4]")
    np.testing.assert_array_equal(read_lengths(js), [3, 4])
    js.write_text("[3, 4.5]")
    with pytest.raises(ValueError, match=r"item 1: length 4.5"):
        read_lengths(js)
    lines.write_text("5\n-2\n")
    with pytest.raises(ValueError, match=r"a.txt:2: length -2"):
        read_lengths(lines)


def test_uniform_short_documents_leave_nothing_to_gain():
    lengths = np.full(64, 2048)
    step = simulate_batch(lengths, LLAMA_8B, Cluster(64), Hardware(), 16384)
    packing = step.seconds["packing"]
    for name in ("varlen", "distca"):
        assert step.seconds[name] == pytest.approx(packing, rel=1e-6)
    assert step.bytes_moved == 0


def test_one_long_document_makes_distca_win_and_pingpong_matter():
    lengths = np.array([131072] + [1024] * 7 * 128)
    hw = Hardware()
    overlap = simulate_batch(lengths, LLAMA_8B, Cluster(64), hw, 131072)
    serial = simulate_batch(lengths, LLAMA_8B, Cluster(64), hw, 131072, ping_pong=False)
    assert set(overlap.seconds) == set(SYSTEMS)
    assert overlap.seconds["distca"] < 0.8 * overlap.seconds["packing"]
    assert overlap.seconds["distca"] < serial.seconds["distca"]
    assert overlap.imbalance <= 1.1 + 1e-9


def test_cost_table_interpolates_and_validates(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("q_len,kv_len,pairs_per_s\n64,64,1e9\n64,1024,2e9\n256,64,3e9\n256,1024,4e9\n")
    table = CostTable.from_csv(path)
    assert table.throughput(64, 64) == pytest.approx(1e9)
    assert table.throughput(128, 64) == pytest.approx(2e9)  # halfway in log2(q)
    assert table.throughput(10**6, 10**6) == pytest.approx(4e9)  # clamped
    assert table.seconds(256, 1024, 8e9) == pytest.approx(2.0)
    path.write_text("q_len,kv_len,pairs_per_s\n64,64,0\n")
    with pytest.raises(ValueError, match="t.csv:2"):
        CostTable.from_csv(path)
