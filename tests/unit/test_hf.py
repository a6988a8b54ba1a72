"""Hugging Face interop: export -> transformers gives our logits; import gives HF's logits;
the CLI round trip is exact; bad input exits 2 naming the path or key."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from distca.cli import main  # noqa: E402
from distca.config import ModelConfig  # noqa: E402
from distca.hf import HFFormatError, hf_config_from_model, hf_from_megatron  # noqa: E402
from distca.hf.io import read_hf, write_hf  # noqa: E402
from distca.hf.local import LocalModel, single_rank_config  # noqa: E402

LLAMA = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=8, num_kv_heads=2,
                    ffn_hidden_size=96, vocab_size=101, rope_theta=5000.0, norm_eps=1e-6)
QWEN2 = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2,
                    ffn_hidden_size=80, vocab_size=97, rope_theta=1e6, norm_eps=1e-6,
                    qkv_bias=True, tie_embeddings=True)
CONFIGS = {"llama-gqa": LLAMA, "qwen2-bias-tied": QWEN2}


pytestmark = pytest.mark.usefixtures("single_process_group")


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random, norms around 1 and biases non-zero, so no mapping hides."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.08 * noise)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens.view(1, -1)).logits[0].float()


@pytest.mark.parametrize("name", CONFIGS)
def test_export_then_transformers_matches_our_logits(name, tmp_path):
    m = CONFIGS[name]
    ours = LocalModel(single_rank_config(m, "torch"))
    _randomize(ours.model, seed=3)
    write_hf(tmp_path, m, hf_from_megatron(ours.model_state(), m))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == json.loads((tmp_path / "config.json").read_text())[
        "architectures"][0]
    tokens = torch.randint(0, m.vocab_size, (37,), generator=torch.Generator().manual_seed(0))
    expected = _hf_logits(hf, tokens)
    assert _rel_err(ours.logits(tokens), expected) < 1e-4


@pytest.mark.parametrize("name", CONFIGS)
def test_import_gives_transformers_logits(name, tmp_path):
    m = CONFIGS[name]
    hf_config = transformers.AutoConfig.for_model(**{
        k: v for k, v in hf_config_from_model(m).items() if k != "architectures"})
    torch.manual_seed(5)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    _randomize(hf, seed=4)
    hf.save_pretrained(tmp_path)
    m_read, state = read_hf(tmp_path)
    assert m_read == m
    ours = LocalModel(single_rank_config(m_read, "torch"))
    ours.load_model_state(state)
    tokens = torch.randint(0, m.vocab_size, (29,), generator=torch.Generator().manual_seed(1))
    assert _rel_err(ours.logits(tokens), _hf_logits(hf, tokens)) < 1e-4


def _save_random_hf(path, m: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    hf_config = transformers.AutoConfig.for_model(**{
        k: v for k, v in hf_config_from_model(m).items() if k != "architectures"})
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    _randomize(hf, seed)
    hf.save_pretrained(path)
    return {k: v.clone() for k, v in hf.state_dict().items()}


def test_cli_round_trip_is_exact(tmp_path, capsys):
    original = _save_random_hf(tmp_path / "hf", QWEN2)
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
    step = tmp_path / "run" / "checkpoints" / "step_00000000"
    assert (step / "meta.json").is_file() and (tmp_path / "run" / "config.yaml").is_file()
    assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out == ""
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    expected = {k: v for k, v in original.items() if k != "lm_head.weight"}  # tied
    assert exported.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(exported[key], value), key


def test_imported_checkpoint_loads_into_the_engine(tmp_path):
    """The imported run directory is an ordinary checkpoint: the engine's loader takes it."""
    from distca.config import load_config
    from distca.rank import make_rank
    from distca.train.checkpoint import latest_checkpoint
    from distca.train.sharded_state import load_state

    _save_random_hf(tmp_path / "hf", LLAMA)
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
    cfg = load_config(tmp_path / "run" / "config.yaml")
    assert cfg.model == LLAMA
    engine = make_rank(cfg)
    step_dir, meta = latest_checkpoint(tmp_path / "run" / "checkpoints")
    load_state(engine.role, step_dir)
    assert meta["step"] == 0 and not engine.role.optimizer.adamw.state  # no optimizer state
    full = engine.full_model_state()
    for name, value in read_hf(tmp_path / "hf")[1].items():
        assert torch.equal(full[name], value), name


def _expect_usage_error(capsys, argv, *needles):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    for needle in needles:
        assert needle in captured.err, captured.err


def test_bad_input_exits_2_naming_the_culprit(tmp_path, capsys):
    _expect_usage_error(capsys, ["import-hf", str(tmp_path / "nope"), str(tmp_path / "a")],
                        str(tmp_path / "nope"))
    _expect_usage_error(capsys, ["export-hf", str(tmp_path / "nope"), str(tmp_path / "b")],
                        str(tmp_path / "nope"))
    hf_dir = tmp_path / "hf"
    _save_random_hf(hf_dir, LLAMA)
    config = json.loads((hf_dir / "config.json").read_text())

    (hf_dir / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    _expect_usage_error(capsys, ["import-hf", str(hf_dir), str(tmp_path / "c")],
                        "config.json", "architectures", "GPT2LMHeadModel")

    (hf_dir / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    _expect_usage_error(capsys, ["import-hf", str(hf_dir), str(tmp_path / "d")],
                        "model.layers.0.mlp.", "shape")

    (hf_dir / "config.json").write_text(json.dumps(
        {**config, "rope_scaling": {"rope_type": "longrope", "factor": 8.0}}))
    _expect_usage_error(capsys, ["import-hf", str(hf_dir), str(tmp_path / "e")], "rope_scaling")


def test_models_with_gates_or_sinks_are_not_exported():
    with pytest.raises(HFFormatError, match="gated_attention"):
        hf_config_from_model(ModelConfig(**{**LLAMA.__dict__, "gated_attention": True}))


@pytest.mark.parametrize("change, needles", [
    ({"num_key_value_heads": 3}, ["num_kv_heads", "3"]),  # used to be a reshape RuntimeError
    ({"head_dim": None, "num_attention_heads": 7}, ["hidden_size", "7"]),
    ({"hidden_size": "64"}, ["hidden_size", "'64'", "not an integer"]),
    ({"vocab_size": None}, ["vocab_size", "missing"]),
    ({"rope_theta": [1]}, ["rope_theta"]),
])
def test_inconsistent_or_mistyped_config_names_the_key(tmp_path, capsys, change, needles):
    hf_dir = tmp_path / "hf"
    _save_random_hf(hf_dir, LLAMA)
    config = {**json.loads((hf_dir / "config.json").read_text()), **change}
    if "rope_theta" in change:
        config.pop("rope_parameters", None)
    (hf_dir / "config.json").write_text(json.dumps(config))
    _expect_usage_error(capsys, ["import-hf", str(hf_dir), str(tmp_path / "run")],
                        str(hf_dir / "config.json"), *needles)
    (hf_dir / "config.json").write_text("[]")
    _expect_usage_error(capsys, ["import-hf", str(hf_dir), str(tmp_path / "run")],
                        "not a JSON object")


def test_corrupt_safetensors_names_the_file(tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    _save_random_hf(hf_dir, LLAMA)
    (hf_dir / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n")
    _expect_usage_error(capsys, ["import-hf", str(hf_dir), str(tmp_path / "run")],
                        str(hf_dir / "model.safetensors"), "not a readable safetensors file")


@pytest.mark.parametrize("index", ['{"weight_map": ["model.safetensors"]}', '[]',
                                   '{"weight_map": {"lm_head.weight": 3}}'])
def test_malformed_shard_index_names_the_file(tmp_path, capsys, index):
    hf_dir = tmp_path / "hf"
    _save_random_hf(hf_dir, LLAMA)
    (hf_dir / "model.safetensors").unlink()
    (hf_dir / "model.safetensors.index.json").write_text(index)
    _expect_usage_error(capsys, ["import-hf", str(hf_dir), str(tmp_path / "run")],
                        str(hf_dir / "model.safetensors.index.json"), "weight_map")


def test_outputs_are_never_written_over(tmp_path, capsys):
    """export-hf into a model directory used to replace its config.json and weights silently."""
    hf_dir = tmp_path / "hf"
    _save_random_hf(hf_dir, LLAMA)
    assert main(["import-hf", str(hf_dir), str(tmp_path / "run")]) == 0
    before = (hf_dir / "config.json").read_text()
    _expect_usage_error(capsys, ["export-hf", str(tmp_path / "run"), str(hf_dir)],
                        str(hf_dir), "not empty")
    assert (hf_dir / "config.json").read_text() == before
    (tmp_path / "file").write_text("")
    for argv in (["export-hf", str(tmp_path / "run")], ["import-hf", str(hf_dir)]):
        _expect_usage_error(capsys, [*argv, str(tmp_path / "file")], "not a directory")


def test_failed_import_leaves_nothing_behind(tmp_path, capsys):
    """The tokenizer is copied before the weights are checked; a failed import used to leave
    it there, so rerunning the fixed command was refused as 'not empty'."""
    from safetensors.torch import load_file, save_file

    hf_dir = tmp_path / "hf"
    _save_random_hf(hf_dir, LLAMA)
    (hf_dir / "tokenizer.json").write_text("{}")
    good = load_file(str(hf_dir / "model.safetensors"))
    save_file({k: v for k, v in good.items() if k != "lm_head.weight"},
              str(hf_dir / "model.safetensors"))
    _expect_usage_error(capsys, ["import-hf", str(hf_dir), str(tmp_path / "run")],
                        "lm_head.weight")
    assert not (tmp_path / "run").exists()
    (tmp_path / "empty").mkdir()
    _expect_usage_error(capsys, ["import-hf", str(hf_dir), str(tmp_path / "empty")],
                        "lm_head.weight")
    assert list((tmp_path / "empty").iterdir()) == []
    save_file(good, str(hf_dir / "model.safetensors"))
    assert main(["import-hf", str(hf_dir), str(tmp_path / "run")]) == 0


def test_llama_with_attention_bias_is_refused(tmp_path, capsys):
    """Such a Llama also has an o_proj bias our model lacks: importing it used to drop that
    tensor silently and give a model with different logits."""
    hf_config = transformers.AutoConfig.for_model(**{
        **{k: v for k, v in hf_config_from_model(LLAMA).items() if k != "architectures"},
        "attention_bias": True})
    transformers.AutoModelForCausalLM.from_config(hf_config).save_pretrained(tmp_path / "hf")
    _expect_usage_error(capsys, ["import-hf", str(tmp_path / "hf"), str(tmp_path / "run")],
                        "o_proj.bias", "unexpected")


def test_import_and_export_carry_the_chat_template_file(tmp_path):
    """transformers saves the chat template as chat_template.jinja; import-hf/export-hf used
    to drop it, and training silently fell back to ChatML."""
    hf_dir = tmp_path / "hf"
    _save_random_hf(hf_dir, LLAMA)
    (hf_dir / "tokenizer.json").write_text("{}")
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    (hf_dir / "chat_template.jinja").write_text(template)
    assert main(["import-hf", str(hf_dir), str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "tokenizer" / "chat_template.jinja").read_text() == template
    assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == template
