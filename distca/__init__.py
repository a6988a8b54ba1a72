"""distca: disaggregated core attention and FocuSFT for long-context training.

Layers (design §1): ``distca.scheduler`` (numpy only) <- ``distca.parallel`` (torch) <- ``distca``.
Importing the package is cheap: heavy modules (torch, megatron, ray) load in the subpackages
that need them.
"""

import warnings

__version__ = "0.2.0"

# megatron-core announces its torch-native fallbacks for the missing Apex and Transformer
# Engine (design §8) and that its own default cuda_graph_scope is deprecated, in every process
# that imports it (the CLI, Ray workers, spawned ranks): nothing a distca user can act on.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
warnings.filterwarnings("ignore", message="full scope is deprecated")
