"""Llama-family megatron-core GPTModel whose core attention is distca's (design §5).

RMSNorm, SwiGLU, grouped-query attention, no biases, RoPE at logical positions (applied in the
core-attention submodule, so megatron's own position embedding is off), optional Qwen3-Next
output gate (megatron's ``attention_output_gate``: q_proj also emits the gate, applied on the
worker) and optional learnable sinks (one logit per head, owned by the submodule).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from distca.config import ModelConfig, Precision
from distca.model.core_attention import DistcaCoreAttention
from distca.model.runtime import AttentionRuntime


def transformer_config(m: ModelConfig, tp: int, pp: int, precision: Precision,
                       sequence_parallel: bool = False) -> TransformerConfig:
    """megatron TransformerConfig for a Llama-family shape; fusions that need CUDA/apex are off."""
    bf16 = precision is Precision.bf16
    return TransformerConfig(
        sequence_parallel=sequence_parallel,
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_kv_heads,
        ffn_hidden_size=m.ffn_hidden_size,
        kv_channels=m.hidden_size // m.num_attention_heads,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=m.qkv_bias,
        attention_output_gate=m.gated_attention,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=not torch.cuda.is_available(),
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
    )


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` (what megatron's torch-native spec builds, the same numbers) taking
    megatron's norm arguments and marking its weight ``sequence_parallel``: with sequence
    parallelism each TP rank normalises its own rows, and the step sums the weight's gradient
    over the TP group (megatron's torch-native norm refuses sequence parallelism)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                 **unused) -> None:
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def layer_spec(runtime: AttentionRuntime, learnable_sinks: bool, num_layers: int,
               sequence_parallel: bool = False):
    """megatron's local (torch-native) GPT layer spec with distca's core attention swapped in;
    with ``sequence_parallel`` the block's spec with :class:`SequenceParallelRMSNorm`s."""
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=DistcaCoreAttention, params={"runtime": runtime, "learnable_sinks": learnable_sinks})
    if not sequence_parallel:
        return spec
    spec.submodules.input_layernorm = SequenceParallelRMSNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelRMSNorm
    return TransformerBlockSubmodules(layer_specs=[spec] * num_layers,
                                      layer_norm=SequenceParallelRMSNorm)


def build_model(m: ModelConfig, runtime: AttentionRuntime, precision: Precision,
                sequence_parallel: bool = False) -> GPTModel:
    """This pipeline stage's GPTModel; call after megatron's parallel_state is initialised."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    config = transformer_config(m, tp, pp, precision, sequence_parallel)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(runtime, m.learnable_sinks, m.num_layers // pp,
                                          sequence_parallel),
        vocab_size=m.vocab_size,
        max_sequence_length=m.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type="none",
    )
    if torch.cuda.is_available():
        model.cuda()
    return model
