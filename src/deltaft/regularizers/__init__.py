"""Regularizers: pure functions in :mod:`.functional`, thin modules in :mod:`.modules`."""

from deltaft.regularizers import functional
from deltaft.regularizers.modules import (
    BSSRegularizer,
    DeltaRegularizer,
    FeatureMapRegularizer,
    L2Regularizer,
    L2SPRegularizer,
)

__all__ = [
    "BSSRegularizer",
    "DeltaRegularizer",
    "FeatureMapRegularizer",
    "L2Regularizer",
    "L2SPRegularizer",
    "functional",
]
