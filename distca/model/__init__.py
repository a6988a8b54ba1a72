"""The model side of a rank: megatron-core's Llama-family model with distca's core attention,
the stage interface the step runs it through, and the per-step attention runtime (design §5).
"""

from distca.model.llama import build_model
from distca.model.runtime import AttentionRuntime
from distca.model.stage import StageLayer, StageModel

__all__ = ["AttentionRuntime", "StageLayer", "StageModel", "build_model"]
