"""Hugging Face interop for Llama- and Qwen2-family models (TP=1 full models).

:mod:`~distca.hf.config_map` maps ``config.json`` <-> :class:`~distca.config.ModelConfig`,
:mod:`~distca.hf.weights` maps parameter names and layouts, :mod:`~distca.hf.io` reads and
writes HF directories (safetensors or GGUF) and distca checkpoints, and
:mod:`~distca.hf.local` runs our model in one process (logits for checks and evaluation).
"""

from distca.hf.config_map import HFFormatError, hf_config_from_model, model_config_from_hf
from distca.hf.weights import hf_from_megatron, megatron_from_hf

__all__ = ["HFFormatError", "hf_config_from_model", "hf_from_megatron", "megatron_from_hf",
           "model_config_from_hf"]
