"""Llama-3 (``rope_type: llama3``) and YaRN RoPE scaling: a random small model imported from
transformers gives transformers' logits (1e-4) at positions past the original context, and the
scaling survives export; unknown kinds are refused naming the key."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from distca.hf import HFFormatError, hf_config_from_model  # noqa: E402
from distca.hf.io import read_hf, write_hf  # noqa: E402
from distca.hf.local import LocalModel, single_rank_config  # noqa: E402
from distca.hf.weights import hf_from_megatron  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_process_group")

ORIGINAL = 48  # the "pretraining" context; the test runs 160 tokens
SCALINGS = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "yarn_beta_attention": {"rope_type": "yarn", "factor": 3.0, "beta_fast": 16.0,
                            "beta_slow": 2.0, "attention_factor": 1.3,
                            "original_max_position_embeddings": ORIGINAL},
}


def _hf_model(scaling: dict):
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=101, max_position_embeddings=4 * ORIGINAL,
        rms_norm_eps=1e-6, rope_parameters={"rope_theta": 5000.0, **scaling})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("name", SCALINGS)
def test_scaled_rope_gives_transformers_logits_past_the_original_context(name, tmp_path):
    hf = _hf_model(SCALINGS[name])
    hf.save_pretrained(tmp_path / "hf")
    m, state = read_hf(tmp_path / "hf")
    assert m.rope_scaling.type == SCALINGS[name]["rope_type"]
    ours = LocalModel(single_rank_config(m, "torch"))
    ours.load_model_state(state)
    tokens = torch.randint(0, 101, (160,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens.view(1, -1)).logits[0]
    got = ours.logits(tokens)
    tail = slice(ORIGINAL, None)  # positions past original_max_position_embeddings
    err = float((got[tail] - expected[tail]).abs().max() / expected[tail].abs().max())
    assert err < 1e-4
    # the same weights without the scaling are far off: the test sees the scaling
    plain = LocalModel(single_rank_config(type(m)(**{**m.__dict__,
                                                     "rope_scaling": type(m.rope_scaling)()}),
                                          "torch"))
    plain.load_model_state(state)
    assert float((plain.logits(tokens)[tail] - expected[tail]).abs().max()
                 / expected[tail].abs().max()) > 1e-2

    write_hf(tmp_path / "out", m, hf_from_megatron(state, m))  # export keeps the scaling
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                             dtype=torch.float32).eval()
    with torch.no_grad():
        again = back(tokens.view(1, -1)).logits[0]
    assert float((again - expected).abs().max() / expected.abs().max()) < 1e-5
    assert hf_config_from_model(m)["rope_scaling"]["rope_type"] == SCALINGS[name]["rope_type"]


def test_unsupported_rope_scaling_is_refused_naming_it(tmp_path):
    hf = _hf_model(SCALINGS["llama3"])
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_scaling", None)
    config["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 5000.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFFormatError, match="rope_parameters.rope_type.*longrope"):
        read_hf(tmp_path)


@pytest.mark.parametrize("overrides, key", [
    (["model.rope_scaling.type=ntk"], "model.rope_scaling.type"),
    (["model.rope_scaling.type=llama3", "model.rope_scaling.factor=8"],
     "model.rope_scaling.original_max_position_embeddings"),
    (["model.rope_scaling.type=yarn", "model.rope_scaling.factor=0.5",
      "model.rope_scaling.original_max_position_embeddings=64"], "model.rope_scaling.factor"),
])
def test_bad_rope_scaling_keys_exit_2_naming_them(overrides, key, capsys):
    from distca.cli import main

    assert main(["config", "show", "recipes/tiny.yaml", *overrides]) == 2
    assert f"{key}:" in capsys.readouterr().err
