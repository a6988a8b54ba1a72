"""FocuSFT: bilevel, dilution-aware fine-tuning with transient fast LoRA weights (design §6).

The bilevel step is :class:`distca.focusft.step.FocusftStep`; this package's root holds only
the fast weights, which the roles of :mod:`distca.roles` build.
"""

from distca.focusft.fast_weights import FastLoRA, top_layer_count

__all__ = ["FastLoRA", "top_layer_count"]
