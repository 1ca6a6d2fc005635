"""Thin ``nn.Module`` wrappers over :mod:`deltaft.regularizers.functional`.

Each module holds its hyperparameters and reference tensors in buffers, so they move with
``.to()``, land in ``state_dict()`` and survive a resume.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from deltaft.layers import channel_axis
from deltaft.layouts import PrefixTokens
from deltaft.regularizers import functional as RF

__all__ = [
    "BSSRegularizer",
    "DeltaRegularizer",
    "FeatureMapRegularizer",
    "L2Regularizer",
    "L2SPRegularizer",
]


def _buffer_name(name: str) -> str:
    # Buffer names cannot contain dots; keep the mapping reversible.
    return name.replace(".", "__")


def _check_layouts(layers: list[str], layouts: RF.Layouts) -> RF.Layouts:
    """``layouts`` (a copy of a mapping), after checking every name and that it covers layers."""
    if layouts is None:
        return None
    if isinstance(layouts, str):
        channel_axis(layouts)
        return layouts
    missing = [n for n in layers if n not in layouts]
    if missing:
        raise ValueError(f"No layout for layers {missing}; layouts cover {sorted(layouts)}.")
    for layout in layouts.values():
        channel_axis(layout)
    return dict(layouts)


def _copy_prefix(prefix_tokens: PrefixTokens) -> PrefixTokens:
    """``prefix_tokens`` (a copy of a mapping), after checking that the counts are ints >= 0."""
    counts = prefix_tokens.values() if isinstance(prefix_tokens, Mapping) else [prefix_tokens]
    for count in counts:
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"prefix_tokens must be integers >= 0, got {prefix_tokens!r}.")
    return dict(prefix_tokens) if isinstance(prefix_tokens, Mapping) else prefix_tokens


class DeltaRegularizer(nn.Module):
    """:func:`~deltaft.regularizers.functional.delta_penalty` with stored attention.

    Args:
        layers: layer names, in order.
        weights: per-layer channel attention ``(C,)`` summing to 1; ``None`` for uniform.
        reduction: ``"sum"`` (reference) or ``"mean"``.
        layouts: the maps' layouts (``"BCHW"``, ``"BHWC"``, ``"BNC"``), one for all layers or
            by layer name; ``None``: by rank (``"BCHW"`` for 4-D, ``"BNC"`` for 3-D maps).
        prefix_tokens: leading tokens of ``(B, N, C)`` maps left out (class, distillation,
            register tokens), one count or by layer name; 0 keeps them all.
    """

    def __init__(
        self,
        layers: list[str],
        weights: Mapping[str, Tensor] | None = None,
        reduction: RF.Reduction = "sum",
        layouts: RF.Layouts = None,
        prefix_tokens: PrefixTokens = 0,
    ) -> None:
        super().__init__()
        RF._check_reduction(reduction)
        self.prefix_tokens = _copy_prefix(prefix_tokens)
        self.layers = list(layers)
        self.reduction: RF.Reduction = reduction
        self.layouts = _check_layouts(self.layers, layouts)
        self.uniform = weights is None
        if weights is not None:
            missing = [n for n in self.layers if n not in weights]
            if missing:
                raise ValueError(
                    f"Attention has no weights for layers {missing}; it covers {sorted(weights)}."
                )
            for name in self.layers:
                w = weights[name].detach().to(torch.float32).clone()
                self.register_buffer(_buffer_name(name), w)

    def weights(self) -> dict[str, Tensor] | None:
        """The attention weights by layer name, or ``None`` when uniform."""
        if self.uniform:
            return None
        return {n: getattr(self, _buffer_name(n)) for n in self.layers}

    def forward(self, source: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> Tensor:
        return RF.delta_penalty(
            source, target, self.weights(), self.reduction, self.layouts, self.prefix_tokens
        )


class FeatureMapRegularizer(nn.Module):
    """:func:`~deltaft.regularizers.functional.feature_map_penalty` (method ``fm``).

    ``layouts`` as in :class:`DeltaRegularizer`: they do not change the value, and each map is
    checked against its layout's rank. ``prefix_tokens`` as in :class:`DeltaRegularizer`.
    """

    def __init__(
        self,
        reduction: RF.Reduction = "sum",
        layouts: RF.Layouts = None,
        prefix_tokens: PrefixTokens = 0,
    ) -> None:
        super().__init__()
        RF._check_reduction(reduction)
        self.prefix_tokens = _copy_prefix(prefix_tokens)
        self.reduction: RF.Reduction = reduction
        self.layouts = layouts if layouts is None or isinstance(layouts, str) else dict(layouts)
        if isinstance(layouts, str):
            channel_axis(layouts)

    def forward(self, source: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> Tensor:
        return RF.feature_map_penalty(
            source, target, self.reduction, self.layouts, self.prefix_tokens
        )


class L2SPRegularizer(nn.Module):
    """:func:`~deltaft.regularizers.functional.l2sp_penalty` toward stored starting values.

    Args:
        reference: parameter name -> starting value; copied into buffers.
    """

    def __init__(self, reference: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.names = list(reference)
        for name, value in reference.items():
            self.register_buffer(_buffer_name(name), value.detach().clone())

    def reference(self) -> dict[str, Tensor]:
        """Starting values by parameter name."""
        return {n: getattr(self, _buffer_name(n)) for n in self.names}

    def forward(self, params: Mapping[str, Tensor]) -> Tensor:
        return RF.l2sp_penalty(params, self.reference())


class L2Regularizer(nn.Module):
    """:func:`~deltaft.regularizers.functional.l2_penalty` over the named parameters."""

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.names = list(names)

    def forward(self, params: Mapping[str, Tensor]) -> Tensor:
        missing = [n for n in self.names if n not in params]
        if missing:
            raise ValueError(f"Parameters {missing[:5]} not found; pass model.named_parameters().")
        return RF.l2_penalty([params[n] for n in self.names])


class BSSRegularizer(nn.Module):
    """:func:`~deltaft.regularizers.functional.bss_penalty` with a stored ``k``.

    Returns the penalty without its strength ``eta``, like the other modules here: the caller
    (e.g. :class:`~deltaft.objective.TransferObjective`'s ``bss``) multiplies.

    Args:
        k: how many of the smallest singular values of the ``(B, D)`` features to shrink
            (1 in the authors' code).

    Example:
        >>> BSSRegularizer(k=1)(torch.diag(torch.tensor([3.0, 2.0, 0.5])))
        tensor(0.2500)
    """

    def __init__(self, k: int = 1) -> None:
        super().__init__()
        RF._check_bss_k(k)
        self.k = k

    def forward(self, features: Tensor) -> Tensor:
        return RF.bss_penalty(features, self.k)

    def extra_repr(self) -> str:
        return f"k={self.k}"
