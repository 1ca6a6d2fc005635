"""deltaft: DELTA transfer learning with feature maps and supervised channel attention.

The public surface, on one screen::

    from deltaft import FeatureExtractor, FrozenSource, TransferObjective, default_layers
    from deltaft.regularizers import functional as RF
    from deltaft.attention import estimate_channel_attention, ChannelAttention
    from deltaft import interpolate_weights, recompute_batchnorm   # WiSE-FT
"""

from deltaft.cotuning import cotuning_loss, estimate_relationship
from deltaft.heads import find_head, replace_head
from deltaft.hooks import FeatureExtractor
from deltaft.interpolate import interpolate_weights, recompute_batchnorm
from deltaft.layers import default_layers, describe_layers, validate_layers
from deltaft.objective import METHODS, TransferObjective
from deltaft.optim import SGDSPD, AdamSPD
from deltaft.source import FrozenSource

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "SGDSPD",
    "AdamSPD",
    "FeatureExtractor",
    "FrozenSource",
    "TransferObjective",
    "__version__",
    "cotuning_loss",
    "default_layers",
    "describe_layers",
    "estimate_relationship",
    "find_head",
    "interpolate_weights",
    "recompute_batchnorm",
    "replace_head",
    "validate_layers",
]
