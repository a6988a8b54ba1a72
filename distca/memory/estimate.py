"""Predicted peak memory of the largest rank of a recipe, part by part.

All sizes are bytes of one rank (plus **runtime**, a constant measured on the CPU); ``b`` is
the compute dtype's size (2 for bf16, 4 for fp32),
``h`` the hidden size, ``f`` the FFN size, ``hq``/``hkv`` the query/key-value heads of one
tensor-parallel rank and ``d`` the head dim, ``T`` = ``data.tokens_per_rank`` (every TP rank of
a stage holds all ``T`` tokens), ``Ls`` the layers of a pipeline stage, ``P`` its parameters.

* **weights**, **gradients**: ``P·b`` each (gradients live in ``.grad`` in the model dtype).
* **optimizer**: fp32 master weights and AdamW moments, 12 bytes a parameter over the
  data-parallel slice (``distca.optimizer``, ZeRO-1); 8 bytes a parameter (moments only) for
  an fp32 model with ``dp = 1``, which is stepped in place.
* **activations**: what the linear parts of a layer keep for backward, per token (counted on
  megatron's local layer with ``saved_tensors_hooks`` at tp = 1 and 2): six hidden-sized
  tensors whole on every TP rank (among them the layer input, first norm output, residual and
  second norm output; ``1/tp`` of the rows with ``parallel.sequence_parallel``), ``h + 5f``
  split over TP, two fp32 norm statistics; under ``model.recompute`` (:mod:`distca.model.recompute`)
  ``selective`` keeps the layer input and first norm output, ``full`` only the layer input,
  sharded over TP. Times ``Ls`` and the micro-batches in flight (``min(pp, micro_batches)`` on
  the first stage); with recompute plus one layer's recomputed activations (measured: the peak
  is then in the backward of a layer, while the logits' tensors are still held; without
  recompute it is at the loss).
* **attention_buffers**: what core attention keeps for backward, never recomputed: as a server,
  the received q, k, v of its tasks, their out and fp32 lse; as a worker, the fp32 partial
  rows it got back and the merged output. Sized from the planner's receive sizes
  (:func:`distca.parallel.planning.receive_bytes`) of sampled batches at the recipe's tolerance
  (:mod:`distca.memory.attention`), the largest rank's.
* **logits** (last stage): ``T·V/tp`` in ``b`` plus an fp32 copy (bf16) and the fp32 gradient.
* **fast_weights** (FocuSFT): the fp32 LoRA A/B and their inner-loop gradients, and the fp32
  adapter inputs each adapted layer keeps: ``4·T·(h + f)``.

The peak is the larger of the backward (everything above) and the update, whose
**update_buffers** are the fp32 gradient slice, master-weight gather and AdamW temporaries
(``16·P/dp``) and two fp32 buckets of the gradient all-reduce (``distca.optimizer.BUCKET``);
an fp32 ``dp = 1`` model is stepped in place (AdamW's temporaries, ``8·P``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distca.config import DistcaConfig, Precision, Recompute
from distca.optimizer import BUCKET

GIB = 2**30
# Process state besides the tensors counted here (module objects, the plan, autograd's graph),
# and as much again on a rank of a multi-process world (its process groups' communication
# buffers), measured on the CPU (benchmarks/results/memory.md). On a GPU the CUDA context and
# NCCL buffers come on top: the recipes' 10% headroom is for them.
RUNTIME = 24.0 * 2**20
PARTS = ("runtime", "weights", "gradients", "optimizer", "activations", "attention_buffers",
         "logits", "fast_weights", "update_buffers")


@dataclass
class MemoryEstimate:
    """Predicted peak of the largest rank: ``parts`` in bytes (the peak phase's; a part absent
    from that phase is 0), ``stage`` the pipeline stage of that rank."""

    parts: dict[str, float]
    stage: int
    device_gib: float | None
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return float(sum(self.parts.values()))

    @property
    def per_rank_gib(self) -> float:
        return self.total / GIB

    @property
    def largest(self) -> str:
        return max(self.parts, key=self.parts.get)

    @property
    def fits(self) -> bool:
        return self.device_gib is None or self.per_rank_gib <= self.device_gib

    def as_dict(self) -> dict:
        return {"per_rank_gib": self.per_rank_gib, "device_gib": self.device_gib,
                "fits": self.fits, "largest_part": self.largest, "stage": self.stage,
                "parts": {k: v / GIB for k, v in self.parts.items()}, "notes": self.notes}


def elem_bytes(cfg: DistcaConfig) -> int:
    return 2 if cfg.trainer.precision is Precision.bf16 else 4


def layer_params(cfg: DistcaConfig) -> int:
    """Parameters of one decoder layer on one tensor-parallel rank."""
    m, tp = cfg.model, cfg.parallel.tp
    h, d = m.hidden_size, m.hidden_size // m.num_attention_heads
    hq, hkv = m.num_attention_heads // tp, m.num_kv_heads // tp
    qkv = h * (hq * (2 if m.gated_attention else 1) + 2 * hkv) * d
    bias = (hq + 2 * hkv) * d if m.qkv_bias else 0
    sinks = hq if m.learnable_sinks else 0
    return qkv + bias + hq * d * h + 3 * h * m.ffn_hidden_size // tp + 2 * h + sinks


def stage_params(cfg: DistcaConfig, stage: int) -> int:
    """Parameters of one rank of pipeline ``stage``."""
    m, p = cfg.model, cfg.parallel
    n = layer_params(cfg) * (m.num_layers // p.pp)
    vocab = m.vocab_size // p.tp * m.hidden_size
    first, last = stage == 0, stage == p.pp - 1
    n += vocab * first
    if last:
        n += m.hidden_size + (0 if (m.tie_embeddings and first) else vocab)
    return n


def activation_bytes_per_token(cfg: DistcaConfig, recompute: Recompute) -> float:
    """What one layer's linear parts keep for backward, per token (module docstring)."""
    m, tp, b = cfg.model, cfg.parallel.tp, elem_bytes(cfg)
    h, f = m.hidden_size, m.ffn_hidden_size
    whole = h / tp if cfg.parallel.sequence_parallel else h  # sharded rows under SP
    gate = 2 * h / tp * b if m.gated_attention else 0.0  # gate and its sigmoid
    if recompute is Recompute.full:
        return h / tp * b
    if recompute is Recompute.selective:
        return 2 * whole * b + 4 + gate
    return (6 * whole + (h + 5 * f) / tp) * b + 8 + gate


def optimizer_bytes(cfg: DistcaConfig, params: int) -> float:
    if cfg.parallel.dp == 1 and cfg.trainer.precision is Precision.fp32:
        return 8.0 * params
    return 12.0 * -(-params // cfg.parallel.dp)


def logits_bytes(cfg: DistcaConfig) -> float:
    b = elem_bytes(cfg)
    n = cfg.data.tokens_per_rank * cfg.model.vocab_size / cfg.parallel.tp
    return n * (b + (4 if b == 2 else 0) + 4)


def fast_weight_bytes(cfg: DistcaConfig, stage: int) -> float:
    """FocuSFT: fp32 adapters and gradients plus the fp32 inputs the adapted linears keep
    (recomputed, not kept, with ``model.recompute``: they sit in the MLP), for the adapted
    layers on pipeline ``stage``, each a tensor rank's slice (fc1's rows, fc2's columns)."""
    f, m, p = cfg.focusft, cfg.model, cfg.parallel
    if not f.enabled:
        return 0.0
    from distca.focusft.fast_weights import top_layer_count

    per_stage = m.num_layers // p.pp
    first = m.num_layers - top_layer_count(m.num_layers, f.layer_fraction)
    top = min(max((stage + 1) * per_stage - max(first, stage * per_stage), 0), per_stage)
    h, ffn = m.hidden_size, m.ffn_hidden_size // p.tp
    # (input, output) width of each adapter (distca.focusft.fast_weights: gate and up are the
    # two halves of megatron's fused linear_fc1, down is linear_fc2)
    dims = {"gate_proj": (h, ffn), "up_proj": (h, ffn), "down_proj": (ffn, h)}
    adapters = sum(f.rank * sum(dims[t]) for t in f.targets)
    inputs = sum(dims[t][0] for t in f.targets) * cfg.data.tokens_per_rank
    if m.recompute is not Recompute.none:
        inputs = 0
    return top * (2 * 4.0 * adapters + 4.0 * inputs)


def in_flight(cfg: DistcaConfig, stage: int) -> int:
    """Micro-batches whose activations a stage holds at once (1F1B order)."""
    p = cfg.parallel
    if p.pp == 1 or cfg.focusft.enabled:  # FocuSFT runs a micro-batch through all stages
        return 1
    return min(p.pp - stage, cfg.data.micro_batches)


def estimate(cfg: DistcaConfig, attention_per_layer: float | None = None) -> MemoryEstimate:
    """The largest rank's predicted peak. ``attention_per_layer``: bytes core attention keeps
    per layer and micro-batch on the largest rank (default: sampled plans of the recipe)."""
    if attention_per_layer is None:
        from distca.memory.attention import attention_bytes_per_layer

        attention_per_layer = attention_bytes_per_layer(cfg)
    best = None
    for stage in sorted({0, cfg.parallel.pp - 1}):
        parts = _stage_parts(cfg, stage, attention_per_layer)
        if best is None or sum(parts.values()) > sum(best[1].values()):
            best = (stage, parts)
    est = MemoryEstimate(best[1], best[0], cfg.trainer.device_memory_gib)
    if cfg.cad.server_mode.value == "dedicated":
        est.notes.append("dedicated attention servers hold no weights; the largest rank is a "
                         "worker")
    return est


def _stage_parts(cfg: DistcaConfig, stage: int, attention_per_layer: float) -> dict[str, float]:
    m, p, b = cfg.model, cfg.parallel, elem_bytes(cfg)
    params = stage_params(cfg, stage)
    recompute = m.recompute
    layers, tokens, mb = m.num_layers // p.pp, cfg.data.tokens_per_rank, in_flight(cfg, stage)
    world = p.dp * p.tp * p.pp
    static = {"runtime": RUNTIME * (2 if world > 1 else 1), "weights": float(params * b),
              "gradients": float(params * b),
              "optimizer": optimizer_bytes(cfg, params), "fast_weights": fast_weight_bytes(cfg, stage)}
    # with recompute, one layer's activations are rebuilt at a time during backward
    working = 0.0 if recompute is Recompute.none else \
        activation_bytes_per_token(cfg, Recompute.none) * tokens
    logits = logits_bytes(cfg) if stage == p.pp - 1 else 0.0
    kept = activation_bytes_per_token(cfg, recompute) * tokens * layers * mb
    backward = {"activations": kept + working,
                "attention_buffers": attention_per_layer * layers * mb, "logits": logits,
                "update_buffers": 0.0}
    if p.dp == 1 and b == 4:
        update = 8.0 * params
    else:
        update = 16.0 * -(-params // p.dp) + 8.0 * min(BUCKET, params) * (p.dp > 1)
    dynamic = backward if sum(backward.values()) >= update else {
        "activations": 0.0, "attention_buffers": 0.0, "logits": 0.0, "update_buffers": update}
    return {k: {**static, **dynamic}[k] for k in PARTS}
