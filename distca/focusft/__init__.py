"""FocuSFT: bilevel, dilution-aware fine-tuning with transient fast LoRA weights (design §6)."""

from distca.focusft.engine import FocusftEngine
from distca.focusft.fast_weights import FastLoRA, top_layer_count

__all__ = ["FastLoRA", "FocusftEngine", "top_layer_count"]
