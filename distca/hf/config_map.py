"""Hugging Face ``config.json`` <-> :class:`distca.config.ModelConfig` (Llama and Qwen2 families).

Only what our model computes is accepted: RMSNorm, SwiGLU (``silu``), GQA, plain RoPE (no
scaling), no MLP/output biases, full attention (no sliding window). Anything else is refused
with a :class:`HFFormatError` naming the file and key, rather than converted into a model that
would silently compute something different.
"""

from __future__ import annotations

from typing import Any

from distca.config import ConfigError, DistcaConfig, ModelConfig, validate

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
    return _number(theta, float, f"{source}: rope_theta")


def _number(value: Any, kind: type, where: str) -> Any:
    """``value`` as ``kind`` (int or float); anything else (a string, a bool, 2.5 for an int)
    raises :class:`HFFormatError` starting with ``where``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and value != int(value)):
        raise HFFormatError(f"{where}: {value!r} is not {'an integer' if kind is int else 'a number'}")
    return kind(value)


def model_config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """The validated :class:`ModelConfig` of a Llama/Qwen2 ``config.json`` dict (``source``
    names it); a missing, non-numeric or inconsistent value raises :class:`HFFormatError`."""
    if not isinstance(hf, dict):
        raise HFFormatError(f"{source}: not a JSON object")
    archs = hf.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs else archs
    if not isinstance(arch, str):
        arch = None
    if arch not in ARCHITECTURES:
        raise HFFormatError(f"{source}: architectures: {arch!r} is not supported "
                            f"(supported: {', '.join(ARCHITECTURES)})")
    _, bias_by_construction = ARCHITECTURES[arch]

    def number(key: str, kind: type, default: Any = None) -> Any:
        if hf.get(key) is None:
            if default is None:
                raise HFFormatError(f"{source}: {key}: missing")
            return kind(default)
        return _number(hf[key], kind, f"{source}: {key}")

    def refuse(key: str, allowed: Any) -> None:
        if hf.get(key, allowed) != allowed:
            raise HFFormatError(f"{source}: {key}: {hf[key]!r} is not supported "
                                f"(only {allowed!r})")

    refuse("hidden_act", "silu")
    refuse("mlp_bias", False)
    refuse("use_sliding_window", False)
    heads = number("num_attention_heads", int)
    hidden = number("hidden_size", int)
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * heads != hidden:
        raise HFFormatError(f"{source}: head_dim: {head_dim} * num_attention_heads {heads} "
                            f"!= hidden_size {hidden} (not supported)")
    qkv_bias = bias_by_construction if bias_by_construction is not None \
        else bool(hf.get("attention_bias", False))
    m = ModelConfig(
        num_layers=number("num_hidden_layers", int),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_heads=number("num_key_value_heads", int, heads),
        ffn_hidden_size=number("intermediate_size", int),
        vocab_size=number("vocab_size", int),
        rope_theta=_rope_theta(hf, source),
        norm_eps=number("rms_norm_eps", float, 1e-6),
        max_position_embeddings=number("max_position_embeddings", int, 4096),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
    )
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
