"""``distca simulate`` with pipeline parallelism: --pp and --micro-batches."""

from __future__ import annotations

import json

import pytest

from distca.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_simulate_pipeline_reports_its_micro_batches(capsys):
    base = ["simulate", "--gpus", "32", "--model", "llama3-8b", "--max-len", "16384",
            "--distribution", "prolong", "--batches", "1", "--json"]
    code, out, err = run(capsys, *base, "--pp", "2")
    assert code == 0 and err == ""
    report = json.loads(out)
    assert (report["dp"], report["pp"], report["micro_batches"]) == (2, 2, 4)  # default 2·pp
    code, out, _ = run(capsys, *base, "--pp", "2", "--micro-batches", "3")
    assert code == 0 and json.loads(out)["micro_batches"] == 3


@pytest.mark.parametrize("argv, named", [
    (["--pp", "2", "--micro-batches", "0"], "--micro-batches must be >= 1"),
    (["--pp", "0"], "--pp must be >= 1"),
    (["--pp", "3"], "tp=8 × pp=3"),
])
def test_simulate_bad_pipeline_input_exits_2(capsys, argv, named):
    code, out, err = run(capsys, "simulate", "--gpus", "16", "--model", "llama3-8b",
                         "--max-len", "4096", *argv)
    assert code == 2 and out == ""
    assert named in err
