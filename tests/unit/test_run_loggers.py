"""The optional Weights & Biases logger (logging.wandb) and the step log's terminal mode."""

import sys

import pytest

from distca.cli import main
from distca.config import load_config
from distca.train.step_log import StepLog, step_line


def test_wandb_logger_is_off_by_default_and_a_clear_error_without_wandb(monkeypatch, capsys):
    assert load_config("recipes/tiny.yaml").logging.wandb is False
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    assert main(["train", "recipes/tiny.yaml", "logging.wandb=true"]) == 2
    err = capsys.readouterr().err
    assert "logging.wandb" in err and "pip install wandb" in err


def test_wandb_offline_run_gets_each_step_once(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from distca.train.wandb_sink import WandbSink

    cfg = load_config("recipes/tiny.yaml", ["logging.wandb=true"])
    sink = WandbSink(cfg, tmp_path)  # offline: no account, no network
    sink.close()
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    logged, opened = [], {}

    class Run:
        def log(self, values, step):
            logged.append((step, values))

        def finish(self):
            logged.append("finished")

    monkeypatch.setattr(wandb, "init", lambda **kw: opened.update(kw) or Run())
    sink = WandbSink(cfg, tmp_path)
    for row in ({"step": 1, "loss": 2.0, "note": "text"}, {"step": 2, "loss": 1.5},
                {"step": 2, "loss": 1.7}):  # step 2 again after a rollback: W&B only goes on
        sink.log(row)
    sink.close()
    assert logged == [(1, {"loss": 2.0}), (2, {"loss": 1.5}), "finished"]
    assert opened["mode"] == "offline" and opened["dir"] == str(tmp_path)
    assert opened["config"]["model"]["num_layers"] == 4


def test_terminal_mode_draws_a_bar_and_no_step_lines(caplog, capsys):
    progress = StepLog(2, bar=True)
    row = {"step": 1, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 10.0, "wall_s": 0.5,
           "imbalance_before": 1.2, "imbalance": 1.0}
    progress.step(row, logged=True)
    progress.close()
    assert caplog.records == [] and "1/2" in capsys.readouterr().err
    assert step_line(row, 2) == "step 1/2  loss 2.0000  lr 0.001  tok/s 10  step 0.50s"
