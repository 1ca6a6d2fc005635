"""Regularizer maths as pure functions of tensors.

Every function here is differentiable with respect to its *target* argument(s) only: source
feature maps and reference weights are detached. Shapes: ``B`` batch, ``C`` channels, ``H x W``
spatial size.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

import torch
from torch import Tensor

__all__ = ["delta_penalty", "feature_map_penalty", "l2_penalty", "l2sp_penalty"]

Reduction = Literal["sum", "mean"]


def _check_reduction(reduction: str) -> None:
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}.")


def _check_maps(source: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> None:
    if set(source) != set(target):
        raise ValueError(
            f"source and target must have the same layers; source has {sorted(source)}, "
            f"target has {sorted(target)}."
        )
    for name, t in target.items():
        s = source[name]
        if t.dim() != 4 or s.shape != t.shape:
            raise ValueError(
                f"Layer {name!r}: expected source and target maps of the same (B, C, H, W) shape, "
                f"got source {tuple(s.shape)} and target {tuple(t.shape)}."
            )


def _channel_sq_error(source: Tensor, target: Tensor) -> Tensor:
    """Per sample and channel spatial mean of the squared difference, shape ``(B, C)``."""
    diff = target - source.detach()  # (B, C, H, W)
    return diff.pow(2).flatten(2).mean(dim=2)  # (B, C)


def delta_penalty(
    source: Mapping[str, Tensor],
    target: Mapping[str, Tensor],
    weights: Mapping[str, Tensor] | None = None,
    reduction: Reduction = "sum",
) -> Tensor:
    r"""DELTA's attention-weighted feature-map distance :math:`\Omega'`.

    For every layer ``l`` with maps of shape ``(B, C, H, W)``::

        D[b, j]  = ||target[l][b, j] - source[l][b, j]||^2 / (H * W)
        Omega'_l = 1/2 * sum_b sum_j C * w[l, j] * D[b, j]
        Omega'   = sum_l Omega'_l                  (reduction="sum", the reference code's)
        Omega'   = sum_l Omega'_l / B              (reduction="mean")

    ``w[l, :]`` sums to 1, so uniform attention (``weights=None``, ``w = 1/C``) multiplies each
    channel by exactly 1. The published ``alpha = 0.01`` pairs with ``"sum"`` at batch 64.

    Args:
        source: frozen source maps by layer name, ``(B, C, H, W)`` each; detached here.
        target: the fine-tuned network's maps, same names and shapes.
        weights: per-layer channel attention ``(C,)`` summing to 1; ``None`` for uniform.
        reduction: ``"sum"`` over the batch (reference) or ``"mean"`` (divide by ``B``).

    Returns:
        A scalar tensor; gradients flow to ``target`` only.

    Example:
        >>> s = {"conv": torch.zeros(2, 3, 4, 4)}
        >>> t = {"conv": torch.ones(2, 3, 4, 4)}
        >>> delta_penalty(s, t)  # 1/2 * 2 samples * 3 channels * 1
        tensor(3.)
    """
    _check_reduction(reduction)
    _check_maps(source, target)
    total: Tensor | None = None
    for name, t in target.items():
        d = _channel_sq_error(source[name], t)  # (B, C)
        channels = t.shape[1]
        if weights is None:
            per_channel = d.sum(dim=0)  # (C,), C * (1/C) == 1
        else:
            if name not in weights:
                raise ValueError(
                    f"No attention weights for layer {name!r}; weights cover {sorted(weights)}."
                )
            w = weights[name].detach().to(device=d.device, dtype=d.dtype)
            if w.shape != (channels,):
                raise ValueError(
                    f"Attention for layer {name!r} has shape {tuple(w.shape)}, "
                    f"expected ({channels},) to match the feature map's channels."
                )
            per_channel = d.sum(dim=0) * (channels * w)  # (C,)
        term = 0.5 * per_channel.sum()
        if reduction == "mean":
            term = term / t.shape[0]
        total = term if total is None else total + term
    if total is None:
        raise ValueError("delta_penalty needs at least one layer; got empty source and target.")
    return total


def feature_map_penalty(
    source: Mapping[str, Tensor],
    target: Mapping[str, Tensor],
    reduction: Reduction = "sum",
) -> Tensor:
    r"""The reference code's "without attention" penalty (method ``fm``).

    ::

        Omega = sum_l 1/2 * ||target[l] - source[l]||_F^2        (reduction="sum")
        Omega = sum_l 1/2 * ||target[l] - source[l]||_F^2 / B    (reduction="mean")

    summed over every element: no ``/(H*W)`` and no channel weighting, so it is ``H*W`` times
    larger per layer than :func:`delta_penalty` with uniform attention.

    Example:
        >>> s = {"conv": torch.zeros(2, 3, 4, 4)}
        >>> t = {"conv": torch.ones(2, 3, 4, 4)}
        >>> feature_map_penalty(s, t)  # 1/2 * 96 elements
        tensor(48.)
    """
    _check_reduction(reduction)
    _check_maps(source, target)
    total: Tensor | None = None
    for name, t in target.items():
        term = 0.5 * (t - source[name].detach()).pow(2).sum()
        if reduction == "mean":
            term = term / t.shape[0]
        total = term if total is None else total + term
    if total is None:
        raise ValueError("feature_map_penalty needs at least one layer; got empty inputs.")
    return total


def l2sp_penalty(params: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> Tensor:
    r"""L2-SP: ``1/2 * sum_{n in reference} ||params[n] - reference[n]||^2``.

    Only the names in ``reference`` count (the pre-trained parameters); ``reference`` is detached.

    Example:
        >>> l2sp_penalty({"w": torch.full((2,), 3.0)}, {"w": torch.ones(2)})
        tensor(4.)
    """
    missing = [n for n in reference if n not in params]
    if missing:
        raise ValueError(
            f"Parameters {missing[:5]} are in the reference but not in the model; "
            "build the reference from the same model."
        )
    terms = [(params[n] - ref.detach()).pow(2).sum() for n, ref in reference.items()]
    if not terms:
        return torch.zeros(())
    return 0.5 * torch.stack(terms).sum()


def l2_penalty(params: Mapping[str, Tensor] | Iterable[Tensor]) -> Tensor:
    r"""``1/2 * sum ||p||^2`` over ``params`` (a mapping or an iterable of tensors).

    Example:
        >>> l2_penalty([torch.full((2,), 2.0)])
        tensor(4.)
    """
    values = list(params.values()) if isinstance(params, Mapping) else list(params)
    if not values:
        return torch.zeros(())
    return 0.5 * torch.stack([p.pow(2).sum() for p in values]).sum()
