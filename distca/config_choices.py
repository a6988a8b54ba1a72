"""The closed sets of values that config keys take (enums the recipes spell by name)."""

from __future__ import annotations

from enum import Enum


class AttentionBackend(Enum):
    auto = "auto"
    torch = "torch"
    cpp = "cpp"
    flash = "flash"
    flex = "flex"


class DistBackend(Enum):
    auto = "auto"  # nccl with CUDA, gloo without
    gloo = "gloo"
    nccl = "nccl"


class ServerMode(Enum):
    in_place = "in_place"  # every worker rank also serves attention
    dedicated = "dedicated"  # extra ranks that only serve attention


class PipelinePlan(Enum):
    """How the lock-step pipeline (pp > 1, disaggregated) plans attention over all ranks."""

    tick = "tick"  # one plan per forward tick over its jobs; a backward stays where it was put
    job = "job"  # one plan per job (stage, micro-batch): every tick balanced, backwards too


class OnNan(Enum):
    stop = "stop"  # fail the run with a clear error (the last checkpoint stays valid)
    skip = "skip"  # drop the step's update and go on
    rollback = "rollback"  # reload the last checkpoint and skip the offending batch


class DataKind(Enum):
    synthetic = "synthetic"  # token ids drawn from a document-length distribution
    text = "text"  # local JSONL (`text` field) or plain-text files
    chat = "chat"  # local JSONL/Parquet with a `messages` list
    synth = "synth"  # chat tasks generated on the fly (data.synth)


class Recompute(Enum):  # activation recomputation (distca.model.recompute documents each)
    none, selective, full = "none", "selective", "full"


CHAT_KINDS = (DataKind.chat, DataKind.synth)  # data made of conversations (attention.mask)


class AttentionMask(Enum):
    """How chat data attends (design §2); text and synthetic data are always causal."""

    causal = "causal"  # each conversation one causal span: ordinary SFT
    glm = "glm"  # FocuSFT's turn mask: context turns bidirectional, replies causal


class Precision(Enum):
    fp32 = "fp32"
    bf16 = "bf16"


# The reference's names: gate_proj and up_proj are the two halves of megatron's fused
# linear_fc1, down_proj is linear_fc2 (each gets its own fast adapter).
FAST_TARGETS = ("gate_proj", "up_proj", "down_proj")
