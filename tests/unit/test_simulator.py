"""Simulator, length distributions and the cost table."""

from __future__ import annotations

import numpy as np
import pytest
from distca.scheduler import CostTable
from distca.scheduler.baselines import cp_rank_seconds, cp_seconds
from distca.scheduler.distributions import read_lengths, sample_lengths
from distca.scheduler.sim_model import linear_seconds_per_token
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
    lines.write_text("5\n99999999999999999999\n")  # no OverflowError from numpy
    with pytest.raises(ValueError, match=r"a.txt:2: length 99999999999999999999"):
        read_lengths(lines)
    lines.write_bytes(b"\xff\xfe5\n")
    with pytest.raises(ValueError, match=r"a.txt: not a text file"):
        read_lengths(lines)


def test_uniform_short_documents_leave_nothing_to_gain():
    lengths = np.full(64, 2048)
    step = simulate_batch(lengths, LLAMA_8B, Cluster(64), Hardware(), 16384)
    packing = step.seconds["packing"]
    for name in ("varlen", "distca", "distca-tick"):
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


@pytest.mark.parametrize("text, message", [
    ("q_len,kv_len,pairs_per_s\n64,64\n", r"t.csv:2: 2 fields, the header has 3"),
    ("q_len,kv_len,pairs_per_s\n64,64,1e9,7\n", r"t.csv:2: 4 fields, the header has 3"),
    ("q_len,kv_len,pairs_per_s\n64,64,1e9\n\n64,64,2e9\n", r"t.csv:4: a second row for q_len=64"),
    (b"\xff\xfe", r"t.csv: not a text CSV"),
])
def test_cost_table_names_malformed_rows(tmp_path, text, message):
    path = tmp_path / "t.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=message):
        CostTable.from_csv(path)


def _cp_reference(lengths, model, cluster, hw, cp, linear_per_token):
    """Per-rank seconds of one CP group holding every document, counted pair by pair."""
    busy = np.zeros(cp)
    for length in lengths:
        ends = [length * j // (2 * cp) for j in range(2 * cp + 1)]
        for r in range(cp):
            for c in (r, 2 * cp - 1 - r):
                q = range(ends[c], ends[c + 1])
                pairs = float(sum(i + 1 for i in q))  # causal: query i sees keys 0..i
                if q:
                    rate = hw.peak_flops * hw.attention_mfu * min(1.0, len(q) / hw.min_efficient_shard)
                    busy[r] += pairs * model.attention_flops_per_pair / (rate * cluster.tp)
                busy[r] += len(q) * linear_per_token
    kv = 2 * sum(lengths) * model.shape.kv_bytes * (cp - 1) / cp
    return busy + kv / (cluster.tp * hw.network_bytes_per_s)


@pytest.mark.parametrize("seed", range(4))
def test_per_doc_cp_matches_pairwise_reference(seed):
    rng = np.random.default_rng(seed)
    cp = int(rng.choice([2, 3, 4]))
    # one-token documents, lengths not divisible by 2·cp, and documents above a replica's share
    lengths = np.concatenate([[1, 1, 2 * cp - 1], rng.integers(1, 700, 5), [int(rng.integers(900, 1500))]])
    cluster = Cluster(8 * cp, tp=8, gpus_per_node=8)
    hw = Hardware(peak_flops=float(rng.uniform(1e11, 1e13)))
    model = ModelSpec(2, 256, 4, 2, 512)
    linear, attention, comm = cp_rank_seconds(lengths, np.zeros(lengths.size, dtype=np.int64), 1,
                                              model, cluster, hw, cp)
    want = _cp_reference(lengths.tolist(), model, cluster, hw, cp,
                         linear_seconds_per_token(model, cluster, hw))
    np.testing.assert_allclose(linear[0] + attention[0] + comm[0], want, rtol=1e-9)
    assert want.max() > want.min()  # uneven chunks leave a real imbalance


def test_per_doc_cp_pays_for_tiny_shards_and_picks_its_best_group():
    lengths = np.full(64 * 8, 256)  # 8 replicas of 16K tokens, short documents only
    cluster = Cluster(64)
    only_eight = simulate_batch(lengths, LLAMA_8B, cluster, Hardware(), 16384, cp=8)
    # split 16 ways, every chunk is 16 tokens: far below the efficient shard, slower than packing
    for name in ("per-doc-cp", "wlb-llm"):
        assert only_eight.seconds[name] > 1.5 * only_eight.seconds["packing"]
    tuned = simulate_batch(lengths, LLAMA_8B, cluster, Hardware(), 16384, cp=(1, 2, 8))
    assert tuned.cp_size == 1
    assert tuned.seconds["wlb-llm"] < only_eight.seconds["wlb-llm"]
    with pytest.raises(ValueError, match="does not divide dp=8"):
        cp_seconds(lengths, LLAMA_8B, cluster, Hardware(), 16384, 3, True, 0.0)
