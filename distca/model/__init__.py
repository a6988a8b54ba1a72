"""megatron-core glue: the Llama-family model with distca's core attention (design §5, §8)."""

from distca.model.cpu_shims import apply_cpu_shims
from distca.model.llama import build_model
from distca.model.runtime import AttentionRuntime

__all__ = ["AttentionRuntime", "apply_cpu_shims", "build_model"]
