"""What the parts of :mod:`deltaft.attention` share: argument checks, batches and the loss."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, Literal

from torch import Tensor
from torch.nn import functional as F

__all__ = [
    "METHODS",
    "Batch",
    "LossFn",
    "Method",
    "as_pair",
    "batch_loss",
    "check_method",
    "check_n_batches",
    "check_temperature",
    "take_batches",
]

logger = logging.getLogger(__name__)

Method = Literal["exact", "reference", "taylor"]
LossFn = Callable[[Tensor, Tensor], Tensor]
Batch = tuple[Tensor, Tensor]

METHODS: tuple[str, ...] = ("exact", "reference", "taylor")


def check_method(method: str) -> None:
    """Raise ``ValueError`` unless ``method`` is one of :data:`METHODS`."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}.")


def check_n_batches(n_batches: int) -> None:
    """Raise ``ValueError`` unless ``n_batches >= 1``."""
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}.")


def check_temperature(temperature: float) -> None:
    """Raise ``ValueError`` unless ``temperature > 0``: the one check of the softmax temperature."""
    if not temperature > 0:  # also rejects NaN
        raise ValueError(f"temperature must be > 0 (e.g. 5.0, the reference), got {temperature}.")


def as_pair(batch: Any) -> Batch:
    """``batch`` as ``(x, y)``, or a ``ValueError`` saying what the loader yielded instead."""
    if (
        isinstance(batch, (tuple, list))
        and len(batch) == 2
        and isinstance(batch[0], Tensor)
        and isinstance(batch[1], Tensor)
    ):
        return batch[0], batch[1]
    kind = f"a sequence of {len(batch)}" if isinstance(batch, (tuple, list)) else type(batch)
    raise ValueError(
        f"Expected the loader to yield (x, y) pairs of tensors, got {kind}; wrap the dataset so "
        "that it returns (image, label)."
    )


def take_batches(loader: Iterable[Any], n_batches: int) -> list[Batch]:
    """The first ``n_batches`` ``(x, y)`` pairs of ``loader`` (fewer if it runs out)."""
    check_n_batches(n_batches)
    batches: list[Batch] = []
    for batch in loader:
        batches.append(as_pair(batch))
        if len(batches) == n_batches:
            break
    if not batches:
        raise ValueError("The loader yielded no batches; expected (x, y) batches of target data.")
    if len(batches) < n_batches:
        logger.info("loader has only %d of the %d batches requested", len(batches), n_batches)
    return batches


def batch_loss(logits: Tensor, y: Tensor, loss_fn: LossFn | None) -> Tensor:
    """``loss_fn(logits, y)``, by default ``F.cross_entropy(logits, y)`` (mean over the batch)."""
    return F.cross_entropy(logits, y) if loss_fn is None else loss_fn(logits, y)
