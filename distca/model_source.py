"""Where a model's shape comes from: ``model.preset`` or ``model.init_from`` (a pretrained
source), as the plain ``model.*`` dict the config loader merges under the recipe.

``model.init_from: PATH`` accepts

* a Hugging Face model directory (``config.json`` + safetensors, sharded or not),
* a ``.gguf`` file, or a directory holding exactly one (and no ``config.json``),
* a distca run directory (its newest checkpoint) or one of its ``checkpoints/step_*``.

The source's shape replaces ``model.preset``; a shape key set explicitly (recipe or command
line) that disagrees with the source is refused naming the key (``max_position_embeddings``
may be changed: a longer context than the source's is what long-context training is for). When
``data.tokenizer`` is null the source's tokenizer is used (a GGUF file is itself one). Only
the shape is read here (``config.json``, GGUF metadata, the run's ``config.yaml``): the
weights are read by every worker when the run starts (:func:`distca.hf.io.read_model_weights`).
No dependency on :mod:`distca.config`, which imports this module.

The ``config.json`` mapping itself (:func:`hf_shape`), for Llama and Qwen2:

Only what our model computes is accepted: RMSNorm, SwiGLU (``silu``), GQA, RoPE (plain,
Llama-3 or YaRN scaling: :mod:`distca.rope_scaling`), no MLP/output biases, full attention (no sliding window). Anything else is refused
with a :class:`HFFormatError` naming the file and key, rather than converted into a model that
would silently compute something different.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distca.rope_scaling import rope_scaling_from_hf

# architecture name -> (model_type, whether q/k/v carry biases by construction)
ARCHITECTURES = {"LlamaForCausalLM": ("llama", None), "Qwen2ForCausalLM": ("qwen2", True)}


class HFFormatError(ValueError):
    """An input directory or file cannot be converted; the message names the path and key."""


def _number(value: Any, kind: type, where: str) -> Any:
    """``value`` as ``kind`` (int or float); anything else (a string, a bool, 2.5 for an int)
    raises :class:`HFFormatError` starting with ``where``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and value != int(value)):
        raise HFFormatError(f"{where}: {value!r} is not {'an integer' if kind is int else 'a number'}")
    return kind(value)


def _rope(hf: dict[str, Any], source: str, max_positions: int) -> tuple[float, dict[str, Any]]:
    """(rope_theta, ``model.rope_scaling``) of ``rope_parameters`` (transformers >= 5) or the
    older ``rope_theta`` + ``rope_scaling``."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    where = "rope_parameters" if params.get("rope_type") not in (None, "default") or not \
        isinstance(scaling, dict) else "rope_scaling"
    chosen = params if where == "rope_parameters" else scaling
    if not isinstance(chosen, dict):
        raise HFFormatError(f"{source}: {where}: {chosen!r} is not a mapping")
    rope = rope_scaling_from_hf(chosen, max_positions, lambda key, message: HFFormatError(
        f"{source}: {where}.{key}: {message}"))
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return _number(theta, float, f"{source}: rope_theta"), rope


def hf_shape(hf: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
    """The ``model.*`` keys (shape, RoPE, norm, biases) of a Llama/Qwen2 ``config.json`` dict
    (``source`` names it); a missing, non-numeric or unsupported value raises
    :class:`HFFormatError`. Consistency of the sizes is left to the config's validation."""
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
    max_positions = number("max_position_embeddings", int, 4096)
    theta, rope_scaling = _rope(hf, source, max_positions)
    return dict(
        num_layers=number("num_hidden_layers", int),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_heads=number("num_key_value_heads", int, heads),
        ffn_hidden_size=number("intermediate_size", int),
        vocab_size=number("vocab_size", int),
        rope_theta=theta,
        rope_scaling=rope_scaling,
        norm_eps=number("rms_norm_eps", float, 1e-6),
        max_position_embeddings=max_positions,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        gated_attention=False,
        learnable_sinks=False,
    )


# keys a source may not be overridden on; max_position_embeddings may (module docstring)
FREE_KEYS = ("max_position_embeddings",)
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def gguf_file(path: Path) -> Path | None:
    """The GGUF file ``path`` names: itself, or the one ``.gguf`` of a directory without a
    ``config.json``; None otherwise."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
    return None


def checkpoint_run(path: Path) -> Path | None:
    """The run directory of a distca run directory or ``RUN/checkpoints/step_*``; else None."""
    if (path / "checkpoints").is_dir() and (path / "config.yaml").is_file():
        return path
    if path.name.startswith("step_") and (path.parent.parent / "config.yaml").is_file():
        return path.parent.parent
    return None


def _gguf_shape(file: Path) -> dict[str, Any]:
    try:
        from transformers import AutoConfig
    except ImportError as exc:
        raise HFFormatError(f"{file}: reading GGUF needs `pip install transformers gguf`") from exc
    try:  # metadata only: nothing is dequantised here
        hf = AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name).to_dict()
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise HFFormatError(f"{file}: transformers cannot read it: {exc}") from exc
    if not hf.get("architectures"):
        hf["architectures"] = [GGUF_ARCHITECTURES.get(hf.get("model_type"),
                                                      str(hf.get("model_type")))]
    return hf_shape(hf, str(file))


def _checkpoint_shape(run: Path) -> tuple[dict[str, Any], str | None]:
    from omegaconf import OmegaConf

    saved = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))
    model = {k: v for k, v in (saved.get("model") or {}).items()
             if k not in ("preset", "init_from")}
    tokenizer = (saved.get("data") or {}).get("tokenizer")
    if tokenizer is None and (run / "tokenizer" / "tokenizer.json").is_file():
        tokenizer = str(run / "tokenizer")
    return model, tokenizer


def source_shape(path: str | Path) -> tuple[str, dict[str, Any], str | None]:
    """(kind: ``hf`` | ``gguf`` | ``checkpoint``, ``model.*`` keys, tokenizer path or None) of
    an ``init_from`` source; :class:`HFFormatError` naming it when it is none of them or its
    architecture is not supported."""
    path = Path(path)
    if not path.exists():
        raise HFFormatError(f"{path}: no such file or directory")
    gguf = gguf_file(path)
    if gguf is not None:
        return "gguf", _gguf_shape(gguf), str(gguf)
    run = checkpoint_run(path)
    if run is not None:
        return ("checkpoint", *_checkpoint_shape(run))
    config_file = path / "config.json"
    if path.is_dir() and config_file.is_file():
        try:
            hf = json.loads(config_file.read_text())
        except ValueError as exc:
            raise HFFormatError(f"{config_file}: not valid JSON: {exc}") from exc
        tokenizer = str(path) if (path / "tokenizer.json").is_file() else None
        return "hf", hf_shape(hf, str(config_file)), tokenizer
    raise HFFormatError(f"{path}: not a Hugging Face model directory (config.json), a .gguf "
                        f"file or a distca run/checkpoint directory")


def model_layer(raw: dict, cli: dict, fail: Callable[[str, str], Exception]
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``model.*`` layer to merge under the recipe, ``data.*`` layer) from ``model.preset`` or
    ``model.init_from`` of the recipe ``raw`` and the command line ``cli`` (plain dicts; the
    command line wins). ``fail(key, message)`` makes the error raised for bad input."""
    def chosen(key: str):  # the command line wins, even with null
        for layer in (cli, raw):
            model = layer.get("model")
            if isinstance(model, dict) and key in model:
                return model[key]
        return None

    preset, source = chosen("preset"), chosen("init_from")
    if source is None:
        if preset is None:
            return {}, {}
        from distca.presets import MODEL_PRESETS

        if preset not in MODEL_PRESETS:
            known = ", ".join(sorted(MODEL_PRESETS))
            raise fail("model.preset", f"unknown preset {preset!r} (known: {known})")
        return dict(MODEL_PRESETS[preset]), {}
    try:
        _, shape, tokenizer = source_shape(str(source))
    except HFFormatError as exc:
        raise fail("model.init_from", str(exc)) from None
    for layer in (raw, cli):
        model = layer.get("model") if isinstance(layer.get("model"), dict) else {}
        for key, value in model.items():
            if key in shape and key not in FREE_KEYS and value is not None \
                    and value != shape[key]:
                raise fail(f"model.{key}", f"{value!r} disagrees with {shape[key]!r} of "
                           f"model.init_from={source}")
    if preset is not None:
        print(f"distca: model.init_from={source} gives the model shape; model.preset={preset} "
              f"is not used", file=sys.stderr)
    data = {} if tokenizer is None or chosen_data_tokenizer(raw, cli) else \
        {"tokenizer": tokenizer}
    return shape, data


def chosen_data_tokenizer(raw: dict, cli: dict) -> bool:
    """Whether the recipe or the command line sets ``data.tokenizer``."""
    return any(isinstance(layer.get("data"), dict) and layer["data"].get("tokenizer")
               is not None for layer in (raw, cli))
