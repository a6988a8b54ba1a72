"""Everything distca knows about megatron-core internals, in one place (design §8).

megatron-core supplies the model (:mod:`distca.model.llama` builds it through public APIs). Two
kinds of reliance on its internals live here and nowhere else, written against megatron-core
0.16 (:data:`MEGATRON_CORE_RANGE`; ``tests/unit/test_megatron_adapter.py`` fails on another
version, so an upgrade re-reads this file first):

**The stage adapter.** :class:`MegatronStage` and :class:`MegatronLayer` implement
:class:`~distca.model.stage.StageModel` on a ``GPTModel``. The layer halves call megatron's own
submodules in the order of its ``TransformerLayer.forward`` and ``SelfAttention.forward``,
including its private ``_forward_attention``, ``_forward_mlp``, ``_apply_output_gate`` and
``bias_dropout_add_exec_handler`` (no recompute, offload or inference paths, which distca does
not use), so a staggered stage computes exactly what megatron's forward computes.

**The CPU shims.** megatron-core assumes CUDA in a few spots that distca reaches on CPU. Each shim below is applied
only when CUDA is absent, is idempotent, and changes nothing else:

* ``torch.cuda.current_device`` (RoPE buffers, the global memory buffer, pipeline schedules)
  returns the CPU device instead of raising.
* The CUDA RNG tracker (``model_parallel_cuda_manual_seed``) is replaced by one that forks the
  CPU generator, so tensor-parallel initialisation and dropout regions work.
* Gradient clipping and the distributed optimizer are not patched: distca clips gradients itself
  and uses a plain optimizer on CPU.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.models.gpt import GPTModel

from distca.model.rope import apply_rope

MEGATRON_CORE_RANGE = ("0.16.1", "0.17")  # [first, last) megatron-core versions this fits

class MegatronLayer:
    """:class:`~distca.model.stage.StageLayer` of a megatron-core ``TransformerLayer`` with distca core attention."""

    def __init__(self, layer) -> None:
        self.layer = layer
        core = layer.self_attention.core_attention
        self.heads, self.head_dim, self.softmax_scale = core.heads, core.head_dim, core.softmax_scale

    def __call__(self, hidden):
        return self.layer(hidden_states=hidden, attention_mask=None)[0]

    def attention_block(self, hidden):
        return self.layer._forward_attention(hidden_states=hidden, attention_mask=None)[0]

    def mlp_block(self, hidden):
        return self.layer._forward_mlp(hidden)

    def before_attention(self, hidden, cos, sin):
        attn = self.layer.self_attention
        n = hidden.shape[0]
        if n == 0:
            # A worker inside one long document can have an empty nano-batch; it still joins
            # the exchanges. megatron's reshape cannot infer the heads of zero rows: run one
            # zero row and keep none of it.
            hidden = hidden.new_zeros(1, *hidden.shape[1:])
        parts = attn.get_query_key_value_tensors(self.layer.input_layernorm(hidden), None,
                                                 output_gate=attn.config.attention_output_gate,
                                                 split_qkv=True)
        # one RoPE row a token: with sequence parallelism linear_qkv gathers the TP ranks'
        # rows (zero-padded to equal shards in the staggered path) and all tokens are kept
        rows = cos.shape[0]
        q, k, v = (x[:rows, 0] for x in parts[:3])
        gate = parts[3][:rows] if len(parts) == 4 else None
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v.contiguous(), gate

    def attention_out(self, out, lse, gate, residual):
        layer = self.layer
        attn = layer.self_attention
        context = attn.core_attention.finish(out, lse)
        if gate is not None:
            context = attn._apply_output_gate(context, gate)
        with layer.bias_dropout_add_exec_handler():
            return layer.self_attn_bda(layer.training, layer.config.bias_dropout_fusion)(
                attn.linear_proj(context), residual, layer.hidden_dropout)

    def after_attention(self, out, lse, gate, residual):
        return self.layer._forward_mlp(self.attention_out(out, lse, gate, residual))


class MegatronStage:
    """:class:`~distca.model.stage.StageModel` of this stage's megatron-core ``GPTModel``."""

    def __init__(self, model: GPTModel, row_group=None) -> None:
        self.model = model
        self.layers = [MegatronLayer(layer) for layer in model.decoder.layers]
        self.pre_process, self.post_process = model.pre_process, model.post_process
        self.row_group = row_group  # the TP group with sequence parallelism

    def forward(self, tokens, hidden_in, labels):
        if not self.pre_process:
            self.model.set_input_tensor(hidden_in)
        return self.model(tokens, None, None, labels=labels)

    def embed(self, tokens, hidden_in):
        return self.model.embedding(input_ids=tokens, position_ids=None) if self.pre_process \
            else hidden_in

    def losses(self, hidden, labels):
        model = self.model
        hidden = model.decoder.final_layernorm(hidden)
        weight = (model.shared_embedding_or_output_weight()
                  if model.share_embeddings_and_output_weights else None)
        logits, _ = model.output_layer(hidden, weight=weight)
        return model.compute_language_model_loss(labels, logits)


_applied = False


class CpuRngTracker:
    """Drop-in for megatron's CudaRNGStatesTracker that keeps named CPU generator states."""

    def __init__(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}

    def is_initialized(self) -> bool:
        return bool(self.states_)

    def reset(self) -> None:
        self.states_ = {}

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"rng state {name!r} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def apply_cpu_shims() -> bool:
    """Patch megatron-core for CPU when CUDA is absent; returns whether shims are active."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    from megatron.core.tensor_parallel import random as mc_random

    torch.cuda.current_device = lambda: torch.device("cpu")
    _shim_tied_embedding_setup()
    tracker = CpuRngTracker()
    mc_random._CUDA_RNG_STATE_TRACKER = tracker
    mc_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _applied = True
    return True


def _shim_tied_embedding_setup() -> None:
    """With tied embeddings and ``pp > 1`` megatron copies the first stage's embedding to the
    last stage's output layer by an all-reduce of ``weight.data.cuda()``: on CPU, of the
    weight itself (``Tensor.cuda`` is the identity only during that call)."""
    from megatron.core.models.common.language_module.language_module import LanguageModule

    setup = LanguageModule.setup_embeddings_and_output_layer

    def on_cpu(self) -> None:
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda t, *args, **kwargs: t
        try:
            setup(self)
        finally:
            torch.Tensor.cuda = cuda

    LanguageModule.setup_embeddings_and_output_layer = on_cpu


def seed_model_parallel(seed: int, tp_rank: int) -> None:
    """Seed the RNG streams megatron expects: the default one and a per-TP-rank one."""
    from megatron.core.tensor_parallel import random as mc_random

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        mc_random.model_parallel_cuda_manual_seed(seed)
        return
    tracker = mc_random.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("model-parallel-rng", seed + 2718 + tp_rank)
