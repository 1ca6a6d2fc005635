"""Naive, loop-by-loop reference implementations that the library is tested against.

Written for obviousness, not speed: plain Python loops over layers, samples, channels and pixels.
"""

from __future__ import annotations

import torch
from torch import Tensor

# --- penalty references ---


def ref_delta_penalty(
    source: dict[str, Tensor],
    target: dict[str, Tensor],
    weights: dict[str, Tensor] | None = None,
    reduction: str = "sum",
) -> Tensor:
    """sum_l 1/2 sum_b sum_j C * w[l,j] * ||t[b,j] - s[b,j]||^2 / (H*W)  (/B when 'mean')."""
    total = torch.zeros((), dtype=torch.float64)
    for name in target:
        t, s = target[name].double(), source[name].double()
        b_size, channels, height, width = t.shape
        layer = torch.zeros((), dtype=torch.float64)
        for b in range(b_size):
            for j in range(channels):
                sq = torch.zeros((), dtype=torch.float64)
                for h in range(height):
                    for w in range(width):
                        sq = sq + (t[b, j, h, w] - s[b, j, h, w]) ** 2
                wj = 1.0 / channels if weights is None else float(weights[name][j])
                layer = layer + channels * wj * sq / (height * width)
        layer = 0.5 * layer
        if reduction == "mean":
            layer = layer / b_size
        total = total + layer
    return total


def ref_feature_map_penalty(
    source: dict[str, Tensor], target: dict[str, Tensor], reduction: str = "sum"
) -> Tensor:
    """sum_l 1/2 * sum over every element (t - s)^2  (/B when 'mean')."""
    total = torch.zeros((), dtype=torch.float64)
    for name in target:
        t, s = target[name].double(), source[name].double()
        layer = torch.zeros((), dtype=torch.float64)
        for value_t, value_s in zip(t.flatten().tolist(), s.flatten().tolist(), strict=True):
            layer = layer + (value_t - value_s) ** 2
        layer = 0.5 * layer
        if reduction == "mean":
            layer = layer / t.shape[0]
        total = total + layer
    return total


def ref_l2sp_penalty(params: dict[str, Tensor], reference: dict[str, Tensor]) -> Tensor:
    """1/2 * sum over the names in reference, element by element."""
    total = 0.0
    for name, ref in reference.items():
        for p, r in zip(params[name].flatten().tolist(), ref.flatten().tolist(), strict=True):
            total += (p - r) ** 2
    return torch.tensor(0.5 * total, dtype=torch.float64)


def ref_l2_penalty(params: list[Tensor]) -> Tensor:
    """1/2 * sum of squares, element by element."""
    total = 0.0
    for p in params:
        for value in p.flatten().tolist():
            total += value**2
    return torch.tensor(0.5 * total, dtype=torch.float64)
