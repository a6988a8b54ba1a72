"""``distca plan`` and ``distca simulate`` from the command line (in process)."""

from __future__ import annotations

import argparse
import json

import pytest

from distca.cli import build_parser, main

REFERENCE = "16384,8192,8192,4096,4096,4096,4096," + ",".join(["2048"] * 8)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_json_reports_balanced_conserved_cost(capsys):
    code, out, err = run(capsys, "plan", "--lengths", REFERENCE, "--servers", "4", "--json")
    assert code == 0 and err == ""
    report = json.loads(out)
    assert report["imbalance_before"] == pytest.approx(2.133, abs=1e-3)
    assert report["imbalance"] <= 1.1
    assert sum(report["server_cost"]) == report["total_pairs"]
    total = 16384 * 16385 // 2 + 2 * 8192 * 8193 // 2 + 4 * 4096 * 4097 // 2 + 8 * 2048 * 2049 // 2
    assert report["total_pairs"] == total
    for key in ("bytes_moved", "num_tasks", "plan_ms"):
        assert report[key] > 0


def test_plan_greedy_baseline_and_lengths_file(capsys, tmp_path):
    path = tmp_path / "lengths.json"
    path.write_text(json.dumps([int(x) for x in REFERENCE.split(",")]))
    code, out, _ = run(capsys, "plan", "--lengths-file", str(path), "--servers", "4",
                       "--planner", "greedy-baseline", "--json")
    assert code == 0
    assert json.loads(out)["imbalance"] == pytest.approx(1.0667, abs=1e-3)
    code, out, _ = run(capsys, "plan", "--lengths", "300,5,5", "--servers", "3")
    assert code == 0 and "imbalance" in out
    assert out.startswith("planner distca: 3 document(s)")  # not "distca:", the error prefix


@pytest.mark.parametrize("argv, named", [
    (["--lengths", "", "--servers", "2"], "--lengths: no lengths given"),
    (["--lengths", "16,abc", "--servers", "2"], "'abc'"),
    (["--lengths", "16,-3", "--servers", "2"], "-3"),
    (["--lengths", "16,0", "--servers", "2"], "length 0"),
    (["--lengths", "16", "--servers", "0"], "--servers"),
    (["--lengths", "16", "--servers", "2", "--tolerance", "-0.5"], "-0.5"),
    (["--lengths-file", "/no/such/file", "--servers", "2"], "/no/such/file"),
    (["--lengths", "16", "--servers", "2", "--tokens-per-worker", "4"], "--tokens-per-worker"),
    (["--lengths", "16", "--servers", "2", "--tokens-per-worker", "0"], "--tokens-per-worker"),
    (["--lengths", "16", "--servers", "2", "--planner", "greedy-baseline", "--cost-table",
      "t.csv"], "would ignore it"),
    # score pairs are int64: too many tokens must not wrap round or crash
    (["--lengths", "99999999999999999999", "--servers", "2"], "99999999999999999999"),
    (["--lengths", "2147483648,2147483648", "--servers", "2"], "4294967296 tokens"),
])
def test_plan_bad_input_exits_2_naming_the_value(capsys, argv, named):
    code, out, err = run(capsys, "plan", *argv)
    assert code == 2 and out == ""
    assert named in err


def test_simulate_json_and_plot(capsys, tmp_path):
    png = tmp_path / "sim.png"
    code, out, err = run(capsys, "simulate", "--gpus", "16", "--model", "llama3-8b",
                         "--max-len", "65536", "--distribution", "prolong", "--batches", "1",
                         "--json", "--plot", str(png))
    assert code == 0 and err == ""
    report = json.loads(out)
    assert set(report["step_seconds"]) == {"packing", "varlen", "per-doc-cp", "wlb-llm", "distca",
                                           "distca-job", "distca-tick"}
    assert report["speedup_vs_packing"]["packing"] == 1.0
    assert png.stat().st_size > 1000


def test_simulate_plot_path_is_checked_and_its_directory_made(capsys, tmp_path):
    argv = ["simulate", "--gpus", "8", "--model", "llama3-8b", "--max-len", "4096",
            "--batches", "1", "--json", "--plot"]
    code, out, err = run(capsys, *argv, str(tmp_path))
    assert code == 2 and out == "" and "--plot" in err
    png = tmp_path / "new" / "sim.png"
    code, out, err = run(capsys, *argv, str(png))
    assert code == 0 and png.stat().st_size > 1000


@pytest.mark.parametrize("argv, named", [
    (["--gpus", "12", "--model", "llama3-8b", "--max-len", "4096"], "12 GPUs"),
    (["--gpus", "8", "--model", "gpt-9", "--max-len", "4096"], "gpt-9"),
    (["--gpus", "8", "--model", "tiny", "--max-len", "64"], "the default --tp 8"),
    (["--gpus", "8", "--model", "tiny", "--max-len", "0"], "--max-len"),
    (["--gpus", "8", "--model", "llama3-8b", "--max-len", "64", "--distribution", "nope.txt"],
     "nope.txt"),
    (["--gpus", "8", "--model", "tiny", "--max-len", "64", "--tokens-per-worker", "0"],
     "--tokens-per-worker"),
    (["--gpus", "8", "--model", "tiny", "--max-len", "64", "--tokens-per-worker", "-1"],
     "--tokens-per-worker"),
    (["--gpus", "8", "--model", "llama3-8b", "--max-len", "64", "--tp", "0"], "--tp"),
    (["--gpus", "8", "--model", "tiny", "--max-len", "64", "--tolerance", "inf"], "--tolerance"),
    (["--gpus", "8", "--model", "tiny", "--max-len", "64", "--distribution", "LENGTHS"],
     "longest length 100"),
])
def test_simulate_bad_input_exits_2(capsys, tmp_path, argv, named):
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("50\n100\n")
    argv = [str(lengths) if a == "LENGTHS" else a for a in argv]
    code, out, err = run(capsys, "simulate", *argv)
    assert code == 2 and out == ""
    assert named in err


@pytest.mark.parametrize("command", [["plan"], ["simulate"], ["profile", "comm"],
                                     ["profile", "attention"], ["profile", "train"]])
def test_every_flag_has_help(command):
    parser = build_parser()
    for name in command:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    assert [a.dest for a in parser._actions if not a.help] == []
