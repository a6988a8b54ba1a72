"""Hugging Face ``config.json`` <-> :class:`distca.config.ModelConfig` (Llama and Qwen2 families).

Only what our model computes is accepted: RMSNorm, SwiGLU (``silu``), GQA, plain RoPE (no
scaling), no MLP/output biases, full attention (no sliding window). Anything else is refused
with a :class:`HFFormatError` naming the file and key, rather than converted into a model that
would silently compute something different.
"""

from __future__ import annotations

from typing import Any

from distca.config import ModelConfig

# architecture name -> (model_type, whether q/k/v carry biases by construction)
ARCHITECTURES = {"LlamaForCausalLM": ("llama", None), "Qwen2ForCausalLM": ("qwen2", True)}


class HFFormatError(ValueError):
    """An input directory or file cannot be converted; the message names the path and key."""


def _rope_theta(hf: dict[str, Any], source: str) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    for key, value in (("rope_parameters.rope_type", params.get("rope_type")),
                       ("rope_scaling", scaling)):
        kind = value.get("rope_type", value.get("type")) if isinstance(value, dict) else value
        if kind not in (None, "default"):
            raise HFFormatError(f"{source}: {key}: RoPE scaling {kind!r} is not supported")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta)


def model_config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """The :class:`ModelConfig` of a Llama/Qwen2 ``config.json`` dict (``source`` names it)."""
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in ARCHITECTURES:
        raise HFFormatError(f"{source}: architectures: {arch!r} is not supported "
                            f"(supported: {', '.join(ARCHITECTURES)})")
    _, bias_by_construction = ARCHITECTURES[arch]

    def need(key: str) -> Any:
        if key not in hf:
            raise HFFormatError(f"{source}: {key}: missing")
        return hf[key]

    def refuse(key: str, allowed: Any) -> None:
        if hf.get(key, allowed) != allowed:
            raise HFFormatError(f"{source}: {key}: {hf[key]!r} is not supported "
                                f"(only {allowed!r})")

    refuse("hidden_act", "silu")
    refuse("mlp_bias", False)
    refuse("use_sliding_window", False)
    heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * heads != hidden:
        raise HFFormatError(f"{source}: head_dim: {head_dim} * num_attention_heads {heads} "
                            f"!= hidden_size {hidden} (not supported)")
    qkv_bias = bias_by_construction if bias_by_construction is not None \
        else bool(hf.get("attention_bias", False))
    return ModelConfig(
        num_layers=int(need("num_hidden_layers")),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        ffn_hidden_size=int(need("intermediate_size")),
        vocab_size=int(need("vocab_size")),
        rope_theta=_rope_theta(hf, source),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
    )


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
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
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
