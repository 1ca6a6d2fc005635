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


def ref_l2sp_grads(
    params: dict[str, Tensor], reference: dict[str, Tensor], scale: float = 1.0
) -> dict[str, Tensor]:
    """Gradient of ``scale * ref_l2sp_penalty`` w.r.t. each parameter: ``scale * (p - r)``."""
    grads = {}
    for name, ref in reference.items():
        pairs = zip(params[name].flatten().tolist(), ref.flatten().tolist(), strict=True)
        values = [scale * (p - r) for p, r in pairs]
        grads[name] = torch.tensor(values, dtype=torch.float64).reshape(ref.shape)
    return grads


def ref_l2_penalty(params: list[Tensor]) -> Tensor:
    """1/2 * sum of squares, element by element."""
    total = 0.0
    for p in params:
        for value in p.flatten().tolist():
            total += value**2
    return torch.tensor(0.5 * total, dtype=torch.float64)


# --- attention references ---


def ref_removal_scores(
    model: torch.nn.Module,
    batches: list[tuple[Tensor, Tensor]],
    layers: list[str],
    only: list[int] | None = None,
) -> dict[str, Tensor]:
    """delta[l][j] = mean_b ( CE(model(x_b) with output channel j of l zeroed, y_b) - CE(...) ).

    A plain double loop: one full forward per layer, channel and batch, in eval mode. ``only``
    restricts the channels (the result then has ``len(only)`` entries per layer).
    """
    model.eval()
    modules = dict(model.named_modules())
    scores: dict[str, Tensor] = {}
    with torch.no_grad():
        for name in layers:
            per_batch = []
            for x, y in batches:
                base = torch.nn.functional.cross_entropy(model(x), y)
                deltas = []
                channels = range(_output_channels(modules[name], model, x))
                for j in channels if only is None else only:

                    def zero_channel(
                        module: torch.nn.Module, args: object, out: Tensor, j: int = j
                    ) -> Tensor:
                        out = out.clone()
                        out[:, j] = 0
                        return out

                    handle = modules[name].register_forward_hook(zero_channel)
                    try:
                        logits = model(x)
                    finally:
                        handle.remove()
                    deltas.append(torch.nn.functional.cross_entropy(logits, y) - base)
                per_batch.append(torch.stack(deltas))
            scores[name] = torch.stack(per_batch).mean(dim=0)
    return scores


def _output_channels(module: torch.nn.Module, model: torch.nn.Module, x: Tensor) -> int:
    seen: list[int] = []
    handle = module.register_forward_hook(lambda m, a, out: seen.append(out.shape[1]))
    try:
        model(x)
    finally:
        handle.remove()
    return seen[0]


def ref_attention_from_scores(
    scores: dict[str, Tensor], temperature: float = 5.0
) -> dict[str, Tensor]:
    """z = (s - mean) / np.std(s) (ddof=0); w = exp(z/T) / sum(exp(z/T)); uniform if std = 0."""
    import numpy as np

    weights = {}
    for name, s in scores.items():
        values = s.double().numpy()
        std = np.std(values)
        if std == 0:
            w = np.full(len(values), 1.0 / len(values))
        else:
            z = (values - np.mean(values)) / std
            e = np.array([np.exp(zj / temperature) for zj in z])
            w = e / np.sum(e)
        weights[name] = torch.from_numpy(w)
    return weights


# --- BSS and WiSE-FT references ---


def ref_bss_penalty(features: Tensor, k: int = 1) -> Tensor:
    """sum of the k smallest eigenvalues of the Gram matrix, built entry by entry in float64.

    The squared singular values of F (B, D) are the eigenvalues of F F^T (B, B) or F^T F (D, D);
    the smaller Gram matrix has exactly min(B, D) of them.
    """
    f = features.double()
    if f.shape[0] > f.shape[1]:
        f = f.t()
    rows, cols = f.shape
    gram = torch.zeros(rows, rows, dtype=torch.float64)
    for i in range(rows):
        for j in range(rows):
            gram[i, j] = sum(float(f[i, d]) * float(f[j, d]) for d in range(cols))
    eigenvalues = torch.linalg.eigvalsh(gram)  # ascending
    return torch.tensor(sum(float(eigenvalues[i]) for i in range(k)), dtype=torch.float64)


def ref_bss_authors(features: Tensor, k: int = 1) -> Tensor:
    """The authors' loop (thuml/Batch-Spectral-Shrinkage, BSS.py), in float64."""
    s = torch.linalg.svd(features.double().t()).S  # torch.svd(feature.t()) there
    num = s.size(0)
    result = torch.zeros((), dtype=torch.float64)
    for i in range(k):
        result = result + torch.pow(s[num - 1 - i], 2)
    return result


def ref_interpolate_weights(
    pretrained: dict[str, Tensor], finetuned: dict[str, Tensor], alpha: float
) -> dict[str, Tensor]:
    """Per key and element: (1 - alpha) * p + alpha * f for floats, f itself for integers."""
    out = {}
    for key, f in finetuned.items():
        if not f.is_floating_point():
            out[key] = f.clone()
            continue
        pairs = zip(pretrained[key].flatten().tolist(), f.flatten().tolist(), strict=True)
        values = [(1 - alpha) * p + alpha * v for p, v in pairs]
        out[key] = torch.tensor(values, dtype=torch.float64).reshape(f.shape)
    return out
