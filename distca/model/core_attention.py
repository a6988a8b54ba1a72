"""The core-attention submodule that megatron's SelfAttention calls (design §5).

It receives this rank's q, k, v after the QKV projection (and the gate split, which megatron
keeps on the worker), applies RoPE at logical positions, hands the tensors to the step's
:class:`AttentionRuntime` (which dispatches the CA-tasks to the attention servers or runs them
locally), and applies the learnable sink once to the merged result.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from distca.attention.merge import apply_sink, make_sinks
from distca.model.rope import apply_rope


class DistcaCoreAttention(MegatronModule):
    """Megatron core-attention submodule backed by :class:`distca.model.runtime.AttentionRuntime`.

    forward(query (S, 1, hq, d), key/value (S, 1, hkv, d), ...) -> (S, 1, hq*d); the attention
    mask argument is ignored: CA-tasks of the step carry the masking.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type=None,
                 attention_type: str = "self", attention_dropout=None, softmax_scale=None,
                 cp_comm_type=None, pg_collection=None, runtime=None, learnable_sinks=False):
        super().__init__(config=config)
        if runtime is None:
            raise ValueError("DistcaCoreAttention needs the step's AttentionRuntime")
        tp = pg_collection.tp.size() if pg_collection is not None else _tp_size()
        self.layer_number = layer_number
        self.runtime = runtime
        self.heads = config.num_attention_heads // tp
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale or self.head_dim ** -0.5
        if learnable_sinks:
            # Per-head logits split across tensor-parallel ranks like the heads themselves;
            # float32 in bf16 models too (make_sinks says why).
            self.sinks = make_sinks(self.heads)
            set_tensor_model_parallel_attributes(self.sinks, is_parallel=True, dim=0, stride=1)
        else:
            self.sinks = None

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("DistcaCoreAttention takes its masking from CA-tasks only")
        q, k, v = query[:, 0], key[:, 0], value[:, 0]
        cos, sin = self.runtime.rope(self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out, lse = self.runtime.attend(q, k, v.contiguous(), self.softmax_scale, self.sinks)
        return self.finish(out, lse)

    def finish(self, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """Merged (out (S, hq, d), lse (S, hq) fp32) -> with the sink applied, (S, 1, hq*d)."""
        if self.sinks is not None:
            out, lse = apply_sink(out, lse, self.sinks)
        return out.reshape(out.shape[0], 1, out.shape[1] * out.shape[2])


def _tp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()
