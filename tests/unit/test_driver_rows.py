"""The training driver's step rows and step log, and `distca data show`, with a stand-in for
the Ray worker group (no Ray cluster: the ranks' replies are given)."""

import json
import logging

import pytest

from distca.cli import main
from distca.config import load_config
from distca.data import make_dataset
from distca.profile.flops import model_flops
from distca.train.driver import Trainer
from distca.train.metrics import MetricsLog, read_metrics
from distca.train.run_dir import RunDir
from distca.train.step_log import StepLog

SYNTH = ["data.synth.count=6", "data.synth.length=200", "data.tokens_per_rank=512"]


class Ranks:
    """Two ranks that record the batches they are sent and reply with fixed statistics."""

    def __init__(self):
        self.trained, self.evaluated = [], []

    def call(self, method, batches, timeout=None, setting=""):  # WorkerGroup.call
        if method == "eval_loss":
            self.evaluated.append(batches)
            return [2.5, 2.5]
        self.trained.append(batches)
        tokens = float(sum(int(b.doc_lengths.sum()) for b in batches))
        stats = {"loss": 3.0, "tokens": tokens, "imbalance_before": 1.5, "imbalance": 1.1,
                 "lr": 1e-3}
        return [{**stats, "memory_mb": 100.0}, {**stats, "memory_mb": 300.0}]


def run_steps(tmp_path, monkeypatch, recipe, overrides, steps, eval_data=False):
    import ray

    monkeypatch.setattr(ray, "put", lambda value: value)  # the batches go to the ranks as is
    cfg = load_config(recipe, overrides)
    trainer = Trainer(cfg, RunDir(tmp_path / "run"), make_dataset(cfg),
                      make_dataset(cfg, eval_data=True) if eval_data else None)
    trainer.peak_flops = 1e12
    ranks, log = Ranks(), MetricsLog(tmp_path / "metrics.jsonl", tmp_path / "tb", 0)
    progress = StepLog(cfg.trainer.steps, bar=False)
    for step in range(1, steps + 1):
        trainer._step(ranks, step, log, progress)
    log.close()
    return cfg, ranks, read_metrics(tmp_path / "metrics.jsonl")


def test_data_show_prints_the_batch_of_the_first_training_step(tmp_path, monkeypatch, capsys):
    recipe = "recipes/tiny-focusft.yaml"
    _, ranks, _ = run_steps(tmp_path, monkeypatch, recipe, SYNTH, steps=1)
    capsys.readouterr()
    assert main(["data", "show", recipe, *SYNTH, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["micro_batches"]
    trained = ranks.trained[0]
    assert len(shown) == len(trained) == 1
    docs = shown[0]["documents"]
    assert [t for d in docs for t in d["tokens"]] == \
        trained[0].tokens[:int(trained[0].doc_lengths.sum())].tolist()
    assert [lab for d in docs for lab in d["labels"]] == \
        trained[0].labels[:int(trained[0].doc_lengths.sum())].tolist()
    assert all(d["turns"][0]["kind"] == "context" for d in docs)
    # as text: the reply (the needle's number) is the marked, loss-bearing span
    assert main(["data", "show", recipe, *SYNTH, "--step", "2"]) == 0
    text = capsys.readouterr().out
    assert text.count("-- document") >= 2 and "\u27e6" in text and "<|im_start|>assistant" in text


def test_step_rows_carry_mfu_memory_and_validation_loss(tmp_path, monkeypatch, caplog):
    (tmp_path / "eval").mkdir()
    data = tmp_path / "eval" / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"document {i} " * 40}) + "\n"
                            for i in range(20)))
    overrides = ["data.kind=text", f"data.paths={data}", f"data.eval_paths={data.parent}",
                 "trainer.eval_interval=2", "trainer.steps=4", "data.tokens_per_rank=256",
                 "data.max_length=256"]
    with caplog.at_level(logging.INFO, logger="distca"):
        cfg, ranks, rows = run_steps(tmp_path, monkeypatch, "recipes/tiny.yaml", overrides, 3,
                                     eval_data=True)
    flops = model_flops(cfg, ranks.trained[0])
    assert rows[0]["tflops"] == pytest.approx(flops / rows[0]["wall_s"] / 1e12)
    assert rows[0]["mfu"] == pytest.approx(flops / rows[0]["wall_s"] / 1e12)  # peak 1 TFLOP/s
    assert all(r["memory_mb"] == 300.0 for r in rows)  # the largest rank's
    # validation every trainer.eval_interval steps, on data.eval_paths (here a directory)
    assert [("eval_loss" in r) for r in rows] == [False, True, False]
    assert len(ranks.evaluated) == 1 and rows[1]["eval_loss"] == 2.5
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split("  ")[0] for line in lines] == ["step 1/4", "step 2/4", "step 3/4"]
    assert "MFU" in lines[0] and "mem 300 MiB" in lines[0] and "eval loss 2.5000" in lines[1]
