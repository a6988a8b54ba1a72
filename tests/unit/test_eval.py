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


def test_greedy_reply_stops_at_the_end_marker_or_the_limit():
    script = iter(b"42, 7<|im_end|>tail")
    assert greedy_reply(script, 50, Decoder(None)) == "42, 7"
    assert greedy_reply(iter(b"42, 7<|im_end|>tail"), 3, Decoder(None)) == "42,"


@pytest.mark.parametrize("glm", [False, True])
def test_kv_cache_decoding_equals_rerunning_the_whole_sequence(glm):
    """Each cached greedy token is the argmax of a full forward over prompt + tokens so far,
    with the same mask (glm: the prompt one bidirectional context turn, the reply causal)."""
    from distca.hf.local import LocalModel, single_rank_config

    model = LocalModel(single_rank_config(TINY, "torch"))
    prompt = torch.randint(0, 256, (23,), generator=torch.Generator().manual_seed(1))
    cached = [t for t, _ in zip(model.greedy(prompt, bidirectional_prompt=glm), range(6))]
    ids = prompt
    for token in cached:
        turns = [(23, True), (ids.numel() - 23, False)] if glm and ids.numel() > 23 else (
            [(23, True)] if glm else None)
        logits = model.logits(ids, turns)
        assert int(logits[-1].argmax()) == token
        ids = torch.cat([ids, torch.tensor([token])])
    assert len(set(cached)) > 1  # a real continuation, not one repeated token


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


def _eager_masses(hf_dir, input_ids, rows, glm):
    """Per-layer (first-token mass, context mass) of transformers' eager attention
    probabilities, averaged over heads and ``rows`` [start, end); context = tokens up to and
    including ``start`` (the prompt). glm: a 4D mask with the prompt bidirectional. Third:
    the summed cross entropy of the rows' next tokens."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(hf_dir), dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.tensor(input_ids).view(1, -1)
    n, (start, end) = ids.shape[1], rows
    kwargs = {}
    if glm:
        allowed = torch.ones(n, n).tril().bool()
        allowed[: start + 1, : start + 1] = True
        kwargs["attention_mask"] = torch.where(allowed, 0.0, float("-inf")).view(1, 1, n, n)
    with torch.no_grad():
        out = hf(ids, output_attentions=True, **kwargs)
    probs = out.attentions  # layers x (1, H, n, n)
    first = [float(p[0, :, start:end, 0].mean()) for p in probs]
    context = [float(p[0, :, start:end, : start + 1].sum(-1).mean()) for p in probs]
    loss = torch.nn.functional.cross_entropy(out.logits[0, start:end], ids[0, start + 1:end + 1],
                                             reduction="sum")
    return first, context, float(loss)


@pytest.mark.parametrize("mask", ["causal", "glm"])
def test_attention_stats_equal_transformers_eager_probabilities(tmp_path, capsys, mask):
    """`distca eval --attention-stats` on a tiny checkpoint: per-layer first-token and context
    mass of the reply rows equal transformers' eager attention on the same ids (exported)."""
    pytest.importorskip("transformers")
    _tiny_checkpoint(tmp_path / "run")
    assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    argv = ["eval", str(tmp_path / "run"), "--task", "niah", "--length", "250", "--n", "2",
            "--max-new-tokens", "2", "--attention-stats", "--mask", mask]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    stats = result["attention_stats"]
    assert result["mask"] == mask and len(stats["examples"]) == 2
    firsts, contexts, losses = [], [], []
    for example in stats["examples"]:
        start, end = example["rows"]
        assert 200 < start < end == len(example["input_ids"]) - 1  # prompt, reply, last row
        first, context, loss = _eager_masses(tmp_path / "hf", example["input_ids"],
                                             (start, end), mask == "glm")
        other, _, _ = _eager_masses(tmp_path / "hf", example["input_ids"], (start, end),
                                    mask != "glm")
        losses.append((loss, end - start))
        # the masks give the reply rows different keys (the prompt attended differently)
        assert not torch.allclose(torch.tensor(first), torch.tensor(other), rtol=1e-3)
        weight = end - start  # statistics pool the rows of all examples
        firsts.append((torch.tensor(first), weight))
        contexts.append((torch.tensor(context), weight))

    def pooled(pairs):
        return sum(v * w for v, w in pairs) / sum(w for _, w in pairs)

    per_layer = stats["per_layer"]
    assert torch.allclose(torch.tensor(per_layer["first_token_mass"]), pooled(firsts),
                          rtol=1e-4)
    assert torch.allclose(torch.tensor(per_layer["context_mass"]), pooled(contexts), rtol=1e-4)
    assert stats["first_token_mass"] == pytest.approx(float(pooled(firsts).mean()), rel=1e-4)
    assert 0.0 <= stats["sink_rate"] <= 1.0 and "sink_mass" not in stats
    # the same forward's reply loss: mean over all examples' reply tokens
    assert stats["reply_loss"] == pytest.approx(
        sum(x for x, _ in losses) / sum(w for _, w in losses), rel=1e-4)


def test_eval_scores_held_out_examples_by_default():
    """`distca eval`'s default seed draws other examples than `distca data synth`'s: it used
    to be the same seed, so an eval after training scored the training examples."""
    from distca.cli import build_parser

    parser = build_parser()
    synth = parser.parse_args(["data", "synth", "--task", "vt", "--length", "300", "--n", "4",
                               "--out", "x.jsonl"]).seed
    held_out = parser.parse_args(["eval", "ckpt", "--task", "vt", "--length", "300",
                                  "--n", "4"]).seed
    train = {e.context for e in generate("vt", 300, 4, synth, _byte_count)}
    assert not train & {e.context for e in generate("vt", 300, 4, held_out, _byte_count)}


def test_eval_bad_mask_exits_2_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as info:
        main(["eval", "ckpt", "--task", "vt", "--length", "300", "--n", "1", "--mask", "full"])
    assert info.value.code == 2 and "--mask" in capsys.readouterr().err
