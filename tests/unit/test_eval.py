"""``distca eval``: scoring pipeline with oracle repliers, greedy decoding, JSON on a tiny
checkpoint, bad input exits 2."""

from __future__ import annotations

import json

import pytest
import torch

from distca.cli import main
from distca.commands.eval import Decoder, evaluate, greedy_reply
from distca.config import ModelConfig
from distca.evals.tasks import generate

TINY = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2,
                   ffn_hidden_size=96, vocab_size=256)


pytestmark = pytest.mark.usefixtures("single_process_group")


def _byte_count(text: str) -> int:
    return len(text.encode())


@pytest.mark.parametrize("task", ["niah", "vt", "cwe"])
def test_accuracy_is_one_for_an_oracle_and_zero_for_a_wrong_replier(task):
    examples = generate(task, 2500, 3, seed=7, count_tokens=_byte_count)
    truth = {e.context: ", ".join(e.answers) for e in examples}

    def oracle(row):  # the answer, found from the prompt alone
        return truth[row["messages"][1]["content"].split("\n\n")[0]]

    assert evaluate(examples, oracle) == {"n": 3, "accuracy": 1.0, "scores": [1.0] * 3}
    assert evaluate(examples, lambda row: "no idea")["accuracy"] == 0.0


def test_greedy_reply_follows_the_argmax_and_stops_at_the_end_marker():
    script = list(b"42, 7<|im_end|>tail")

    def logits_fn(ids):  # emits the script one byte per call, whatever the prompt
        out = torch.zeros(ids.numel(), 256)
        out[-1, script[ids.numel() - 3]] = 1.0
        return out

    assert greedy_reply(logits_fn, [1, 2, 3], 50, Decoder(None)) == "42, 7"
    assert greedy_reply(logits_fn, [1, 2, 3], 3, Decoder(None)) == "42,"


def _tiny_checkpoint(path):
    from distca.hf.io import write_checkpoint
    from distca.hf.local import LocalModel, single_rank_config

    model = LocalModel(single_rank_config(TINY, "torch"))
    return write_checkpoint(path, TINY, model.model_state(), origin="test")


def test_eval_prints_parseable_json(tmp_path, capsys):
    step = _tiny_checkpoint(tmp_path / "run")
    argv = ["eval", str(tmp_path / "run"), "--task", "niah", "--length", "300", "--n", "2",
            "--max-new-tokens", "4"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 2 and result["task"] == "niah"
    assert 0.0 <= result["accuracy"] <= 1.0 and len(result["scores"]) == 2
    argv = ["eval", str(step), "--task", "vt", "--length", "300", "--n", "1",
            "--max-new-tokens", "1"]
    assert main(argv) == 0  # a step directory works too
    assert json.loads(capsys.readouterr().out)["n"] == 1


def test_eval_bad_input_exits_2(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing"), "--task", "vt", "--length", "100",
                 "--n", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and str(tmp_path / "missing") in captured.err
    _tiny_checkpoint(tmp_path / "run")
    assert main(["eval", str(tmp_path / "run"), "--task", "niah", "--length", "5",
                 "--n", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "too short" in captured.err
