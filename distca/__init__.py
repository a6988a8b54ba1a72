"""distca: disaggregated core attention and FocuSFT for long-context training.

Layers (design §1): ``distca.scheduler`` (numpy only) <- ``distca.parallel`` (torch) <- ``distca``.
Importing the package is cheap: heavy modules (torch, megatron, ray) load in the subpackages
that need them.
"""

__version__ = "0.1.0"
