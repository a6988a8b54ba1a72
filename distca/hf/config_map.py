"""Hugging Face ``config.json`` <-> :class:`distca.config.ModelConfig` (Llama and Qwen2 families).

What is accepted, and the keys read, are in :mod:`distca.hf.shape`; here the shape becomes a
validated :class:`ModelConfig`, and a :class:`ModelConfig` a ``config.json``.
"""

from __future__ import annotations

from typing import Any

from distca.config import ConfigError, DistcaConfig, ModelConfig, validate
from distca.model_source import ARCHITECTURES, HFFormatError, hf_shape
from distca.rope_scaling import RopeScalingConfig, rope_scaling_to_hf

__all__ = ["ARCHITECTURES", "HFFormatError", "hf_config_from_model", "model_config_from_hf"]


def model_config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """The validated :class:`ModelConfig` of a Llama/Qwen2 ``config.json`` dict (``source``
    names it); a missing, non-numeric or inconsistent value raises :class:`HFFormatError`."""
    shape = hf_shape(hf, source)
    m = ModelConfig(**{**shape, "rope_scaling": RopeScalingConfig(**shape["rope_scaling"])})
    # sizes the weight layout cannot hold (heads not dividing hidden_size, ...) fail here,
    # naming the file, instead of as a reshape error deep in the conversion
    try:
        validate(DistcaConfig(model=m), source)
    except ConfigError as exc:
        raise HFFormatError(str(exc)) from None
    return m


def hf_config_from_model(m: ModelConfig) -> dict[str, Any]:
    """A ``config.json`` dict for ``m``: Qwen2 when q/k/v have biases, Llama otherwise."""
    if m.gated_attention or m.learnable_sinks:
        raise HFFormatError("model.gated_attention / model.learnable_sinks: Llama and Qwen2 "
                            "checkpoints have neither, so this model cannot be exported")
    common = {
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.hidden_size // m.num_attention_heads,
        "vocab_size": m.vocab_size,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta,
                            **(rope_scaling_to_hf(m.rope_scaling) or {})},
        "rope_scaling": rope_scaling_to_hf(m.rope_scaling),
        "max_position_embeddings": m.max_position_embeddings,
        "tie_word_embeddings": m.tie_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "attention_dropout": 0.0,
    }
    if m.qkv_bias:
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                "use_sliding_window": False, **common}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "attention_bias": False, "mlp_bias": False, **common}
