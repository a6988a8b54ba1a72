"""FocuSFT: bilevel, dilution-aware fine-tuning with transient fast LoRA weights (design §6).

:class:`FocusftEngine` is imported on first use: ``distca.engine`` (which it extends) imports
``distca.focusft.fast_weights`` through the attention server, and an eager import here would
close that cycle.
"""

from distca.focusft.fast_weights import FastLoRA, top_layer_count

__all__ = ["FastLoRA", "FocusftEngine", "top_layer_count"]


def __getattr__(name: str):
    if name == "FocusftEngine":
        from distca.focusft.engine import FocusftEngine

        return FocusftEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
