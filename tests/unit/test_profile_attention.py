import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from distca.scheduler import CostTable

from distca.attention import make_task_list
from distca.attention.tasks import task_mask
from distca.cli import main
from distca.profile.attention import MAX_BATCH_TOKENS, batch_copies, task_pairs


@pytest.mark.parametrize("q_len,kv_len", [(1, 1), (1, 7), (7, 1), (5, 5), (3, 9), (9, 3), (64, 20)])
@pytest.mark.parametrize("causal", [True, False])
def test_task_pairs_counts_the_mask(q_len, kv_len, causal):
    tasks = make_task_list([[0, q_len]], [[0, kv_len]], [causal], q_len, kv_len)
    assert task_pairs(q_len, kv_len, causal) == int(task_mask(tasks).sum())


def test_profile_attention_writes_a_cost_table(tmp_path):
    table = tmp_path / "table.csv"
    out = subprocess.run([sys.executable, "-m", "distca.cli", "profile", "attention",
                          "--backend", "torch", "--q-lens", "16,64", "--kv-lens", "16,64,128",
                          "--threads", "1", "--min-pairs", "4096", "--out", str(table), "--json"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    result = json.loads(out)
    assert result["backend"] == "torch" and result["heads"] == 4 and result["kv_heads"] == 2
    rows = result["rows"]
    assert len(rows) == 2 * 2 * 3
    for r in rows:
        pairs = task_pairs(r["q_len"], r["kv_len"], r["mask"] == "causal")
        assert r["seconds_per_task"] > 0
        assert r["pairs_per_s"] == pytest.approx(pairs / r["seconds_per_task"], rel=1e-9)
    with table.open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    for mask in ("causal", "full"):
        cost = CostTable.from_csv(table, mask=mask)
        assert list(cost.q_lens) == [16, 64] and list(cost.kv_lens) == [16, 64, 128]
        for r in (r for r in rows if r["mask"] == mask):
            # 6 significant digits in the CSV
            assert cost.throughput(r["q_len"], r["kv_len"]) == pytest.approx(r["pairs_per_s"],
                                                                            rel=1e-5)


def test_cost_table_mask_column_selects_rows(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("q_len,kv_len,mask,pairs_per_s\n1,1,causal,5\n1,1,full,9\n")
    assert CostTable.from_csv(path).throughput(1, 1) == 5
    assert CostTable.from_csv(path, mask="full").throughput(1, 1) == 9
    with pytest.raises(ValueError, match="no throughput rows with mask 'other'"):
        CostTable.from_csv(path, mask="other")
    assert np.isfinite(CostTable.from_csv(path).seconds(1, 1, 10))


@pytest.mark.parametrize("argv,flag", [(["--q-lens", "1,x"], "--q-lens"),
                                        (["--kv-lens", "0"], "--kv-lens"),
                                        (["--masks", "causal,diag"], "--masks"),
                                        (["--model", "nope"], "--model"),
                                        (["--tp", "3"], "--tp"),
                                        (["--tp", "0"], "--tp"),
                                        (["--tp", "-2"], "--tp"),
                                        (["--min-pairs", "0"], "--min-pairs"),
                                        (["--repeats", "0"], "--repeats"),
                                        (["--clock", "cpu", "--threads", "2", "--q-lens", "16",
                                          "--kv-lens", "16", "--masks", "causal",
                                          "--min-pairs", "256", "--repeats", "1"], "--threads")])
def test_profile_attention_bad_input(argv, flag, capsys):
    assert main(["profile", "attention", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and flag in captured.err


def test_profile_attention_out_path_is_checked_before_measuring(tmp_path, capsys):
    assert main(["profile", "attention", "--out", str(tmp_path)]) == 2  # a directory
    captured = capsys.readouterr()
    assert captured.out == "" and "--out" in captured.err and "directory" in captured.err
    table = tmp_path / "new" / "dir" / "t.csv"  # missing parents are made
    assert main(["profile", "attention", "--backend", "torch", "--q-lens", "16",
                 "--kv-lens", "16", "--masks", "causal", "--min-pairs", "256",
                 "--repeats", "1", "--out", str(table)]) == 0
    assert CostTable.from_csv(table).throughput(16, 16) > 0


def test_batch_copies_reach_min_pairs_within_a_token_budget():
    assert batch_copies(64, 64, False, 1 << 20) == 256  # 4096 pairs a task
    assert batch_copies(64, 64, False, 1) == 1
    assert batch_copies(1 << 17, 1 << 17, True, 1 << 20) == 1  # one task, even past the budget
    # one-token tasks: a million copies (gigabytes of q/k/v) would reach min_pairs
    copies = batch_copies(1, 1, True, 1 << 20)
    assert copies * 2 <= MAX_BATCH_TOKENS and copies >= MAX_BATCH_TOKENS // 4
