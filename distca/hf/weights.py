"""Parameter names and layouts: Hugging Face Llama/Qwen2 <-> megatron GPTModel (TP=1).

Megatron's fused ``linear_qkv`` stores q, k and v per query group: for each of the ``h_kv``
groups, its ``h_q/h_kv`` query heads, then its key head, then its value head (rows of
``head_dim`` each). Hugging Face keeps ``q_proj``, ``k_proj``, ``v_proj`` separate, heads in
order. ``linear_fc1`` is ``[gate_proj; up_proj]`` stacked along the output rows.
"""

from __future__ import annotations

import torch

from distca.config import ModelConfig
from distca.hf.config_map import HFFormatError


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    """q (h_q*d, ...), k and v (h_kv*d, ...) -> megatron's grouped (h_q*d + 2*h_kv*d, ...)."""
    d, g = m.hidden_size // m.num_attention_heads, m.num_kv_heads
    per = m.num_attention_heads // g
    rest = q.shape[1:]
    groups = torch.cat([q.reshape(g, per * d, *rest), k.reshape(g, d, *rest),
                        v.reshape(g, d, *rest)], dim=1)
    return groups.reshape(-1, *rest)


def _split_qkv(qkv: torch.Tensor, m: ModelConfig) -> tuple[torch.Tensor, ...]:
    d, g = m.hidden_size // m.num_attention_heads, m.num_kv_heads
    per = m.num_attention_heads // g
    rest = qkv.shape[1:]
    groups = qkv.reshape(g, (per + 2) * d, *rest)
    q, k, v = groups.split([per * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def _layer_names(i: int) -> list[tuple[str, str]]:
    """(megatron, HF) pairs copied as they are in layer ``i``."""
    meg, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
    return [(meg + "input_layernorm.weight", hf + "input_layernorm.weight"),
            (meg + "self_attention.linear_proj.weight", hf + "self_attn.o_proj.weight"),
            (meg + "pre_mlp_layernorm.weight", hf + "post_attention_layernorm.weight"),
            (meg + "mlp.linear_fc2.weight", hf + "mlp.down_proj.weight")]


def _top_names(m: ModelConfig) -> list[tuple[str, str]]:
    names = [("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
             ("decoder.final_layernorm.weight", "model.norm.weight")]
    if not m.tie_embeddings:
        names.append(("output_layer.weight", "lm_head.weight"))
    return names


def megatron_from_hf(hf: dict[str, torch.Tensor], m: ModelConfig,
                     source: str = "<weights>") -> dict[str, torch.Tensor]:
    """Our megatron state dict (TP=1) from a Hugging Face Llama/Qwen2 state dict.

    Only tensors that carry nothing are passed over (RoPE's ``inv_freq`` buffers, ``lm_head``
    of a tied model); any other extra tensor (say the ``o_proj.bias`` of a Llama with
    ``attention_bias``) belongs to a model ours does not compute, so it is refused."""
    carry_nothing = {k for k in hf if k.endswith("rotary_emb.inv_freq")
                     or (m.tie_embeddings and k == "lm_head.weight")}
    check_shapes({k: v for k, v in hf.items() if k not in carry_nothing}, expected_hf_shapes(m),
                 source)

    def take(name: str) -> torch.Tensor:
        return hf[name]

    out = {meg: take(name) for meg, name in _top_names(m)}
    for i in range(m.num_layers):
        out.update({meg: take(name) for meg, name in _layer_names(i)})
        attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        meg = f"decoder.layers.{i}."
        out[meg + "self_attention.linear_qkv.weight"] = _fuse_qkv(
            take(attn + "q_proj.weight"), take(attn + "k_proj.weight"),
            take(attn + "v_proj.weight"), m)
        if m.qkv_bias:
            out[meg + "self_attention.linear_qkv.bias"] = _fuse_qkv(
                take(attn + "q_proj.bias"), take(attn + "k_proj.bias"),
                take(attn + "v_proj.bias"), m)
        out[meg + "mlp.linear_fc1.weight"] = torch.cat(
            [take(mlp + "gate_proj.weight"), take(mlp + "up_proj.weight")], dim=0)
    return {k: v.contiguous() for k, v in out.items()}


def hf_from_megatron(state: dict[str, torch.Tensor], m: ModelConfig,
                     source: str = "<checkpoint>") -> dict[str, torch.Tensor]:
    """A Hugging Face Llama/Qwen2 state dict from our megatron state dict (TP=1)."""
    check_shapes(state, expected_megatron_shapes(m), source)
    out = {name: state[meg] for meg, name in _top_names(m)}
    for i in range(m.num_layers):
        out.update({name: state[meg] for meg, name in _layer_names(i)})
        attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        meg = f"decoder.layers.{i}."
        q, k, v = _split_qkv(state[meg + "self_attention.linear_qkv.weight"], m)
        out.update({attn + "q_proj.weight": q, attn + "k_proj.weight": k,
                    attn + "v_proj.weight": v})
        if m.qkv_bias:
            q, k, v = _split_qkv(state[meg + "self_attention.linear_qkv.bias"], m)
            out.update({attn + "q_proj.bias": q, attn + "k_proj.bias": k,
                        attn + "v_proj.bias": v})
        gate, up = state[meg + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out.update({mlp + "gate_proj.weight": gate, mlp + "up_proj.weight": up})
    return {k: v.contiguous() for k, v in out.items()}


def expected_megatron_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of the TP=1 megatron model of ``m`` and its shape."""
    h, f, d = m.hidden_size, m.ffn_hidden_size, m.hidden_size // m.num_attention_heads
    qkv = (m.num_attention_heads + 2 * m.num_kv_heads) * d
    shapes = {"embedding.word_embeddings.weight": (m.vocab_size, h),
              "decoder.final_layernorm.weight": (h,)}
    if not m.tie_embeddings:
        shapes["output_layer.weight"] = (m.vocab_size, h)
    for i in range(m.num_layers):
        p = f"decoder.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,),
                       p + "self_attention.linear_qkv.weight": (qkv, h),
                       p + "self_attention.linear_proj.weight": (h, m.num_attention_heads * d),
                       p + "pre_mlp_layernorm.weight": (h,),
                       p + "mlp.linear_fc1.weight": (2 * f, h),
                       p + "mlp.linear_fc2.weight": (h, f)})
        if m.qkv_bias:
            shapes[p + "self_attention.linear_qkv.bias"] = (qkv,)
    return shapes


def expected_hf_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of ``m`` must hold and its shape."""
    meta = {k: torch.empty(s, device="meta") for k, s in expected_megatron_shapes(m).items()}
    return {k: tuple(v.shape) for k, v in hf_from_megatron(meta, m).items()}


def check_shapes(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                 source: str) -> None:
    """Raise :class:`HFFormatError` naming the first missing, extra or mis-shaped tensor."""
    for name, shape in expected.items():
        if name not in state:
            raise HFFormatError(f"{source}: {name}: missing tensor")
        if tuple(state[name].shape) != shape:
            raise HFFormatError(f"{source}: {name}: shape {tuple(state[name].shape)} does not "
                                f"match the config's {shape}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise HFFormatError(f"{source}: {extra[0]}: unexpected tensor "
                            f"({len(extra)} unexpected in all)")
