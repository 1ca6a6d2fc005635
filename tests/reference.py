"""Naive, loop-by-loop reference implementations that the library is tested against.

Written for obviousness, not speed: plain Python loops over layers, samples, channels and pixels.
"""

from __future__ import annotations

from typing import Any

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


# --- LwF distillation, SPD and Co-Tuning references ---


def ref_distillation_penalty(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """T^2 / B * sum_b sum_k p[b,k] * (log p[b,k] - log q[b,k]), softmaxes written out."""
    import math

    total = 0.0
    rows = list(zip(student.tolist(), teacher.tolist(), strict=True))
    for s_row, t_row in rows:
        s_exp = [math.exp(v / temperature) for v in s_row]
        t_exp = [math.exp(v / temperature) for v in t_row]
        for s_e, t_e in zip(s_exp, t_exp, strict=True):
            p, q = t_e / sum(t_exp), s_e / sum(s_exp)
            total += p * (math.log(p) - math.log(q))
    return torch.tensor(temperature**2 * total / len(rows), dtype=torch.float64)


def _ref_spd_project(
    param: list[float], new: list[float], grad: list[float], anchor: list[float], wd: float
) -> tuple[list[float], bool]:
    """The published SPD rule on flat lists; also says whether the projection changed anything."""
    condition = -sum(g * (p - a) for g, p, a in zip(grad, param, anchor, strict=True))
    if not condition < 0:
        return new, False
    curr = sum((n - a) ** 2 for n, a in zip(new, anchor, strict=True)) ** 0.5
    prev = sum((p - a) ** 2 for p, a in zip(param, anchor, strict=True)) ** 0.5
    ratio = min(max((curr - prev) / curr, 0.0), 1.0)
    out = [n - wd * ratio * (n - a) for n, a in zip(new, anchor, strict=True)]
    return out, ratio > 0


def ref_adam_spd(
    params: list[Tensor],
    grads: list[list[Tensor]],
    anchors: list[Tensor | None],
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    amsgrad: bool = False,
) -> tuple[list[Tensor], int]:
    """AdamSPD (GT-RIPL adamSPD.py) element by element: the final parameters after one step per
    entry of ``grads`` (``grads[t][i]`` is parameter ``i``'s gradient at step ``t + 1``), and
    how many (step, tensor) pairs the projection changed. ``anchors[i] = None``: plain Adam."""
    beta1, beta2 = betas
    values = [p.flatten().tolist() for p in params]
    m = [[0.0] * len(v) for v in values]
    v2 = [[0.0] * len(v) for v in values]
    vmax = [[0.0] * len(v) for v in values]
    projected = 0
    for t, step_grads in enumerate(grads, start=1):
        for i, grad_tensor in enumerate(step_grads):
            g = grad_tensor.flatten().tolist()
            new = []
            for k, gk in enumerate(g):
                m[i][k] = beta1 * m[i][k] + (1 - beta1) * gk
                v2[i][k] = beta2 * v2[i][k] + (1 - beta2) * gk * gk
                vmax[i][k] = max(vmax[i][k], v2[i][k])
                second = vmax[i][k] if amsgrad else v2[i][k]
                denom = second**0.5 / (1 - beta2**t) ** 0.5 + eps
                new.append(values[i][k] - lr / (1 - beta1**t) * m[i][k] / denom)
            anchor = anchors[i]
            if anchor is not None:
                new, hit = _ref_spd_project(
                    values[i], new, g, anchor.flatten().tolist(), weight_decay
                )
                projected += hit
            values[i] = new
    out = [
        torch.tensor(v, dtype=torch.float64).reshape(p.shape)
        for v, p in zip(values, params, strict=True)
    ]
    return out, projected


def ref_sgd_spd(
    params: list[Tensor],
    grads: list[list[Tensor]],
    anchors: list[Tensor | None],
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
) -> tuple[list[Tensor], int]:
    """SGD(momentum) then the SPD rule, element by element (see :func:`ref_adam_spd`)."""
    values = [p.flatten().tolist() for p in params]
    bufs: list[list[float] | None] = [None] * len(values)
    projected = 0
    for step_grads in grads:
        for i, grad_tensor in enumerate(step_grads):
            g = grad_tensor.flatten().tolist()
            direction = g
            if momentum != 0:
                previous = bufs[i]
                if previous is None:
                    buf = list(g)
                else:
                    buf = [
                        momentum * b + (1 - dampening) * gk
                        for b, gk in zip(previous, g, strict=True)
                    ]
                bufs[i] = buf
                direction = (
                    [gk + momentum * b for gk, b in zip(g, buf, strict=True)] if nesterov else buf
                )
            new = [p - lr * d for p, d in zip(values[i], direction, strict=True)]
            anchor = anchors[i]
            if anchor is not None:
                new, hit = _ref_spd_project(
                    values[i], new, g, anchor.flatten().tolist(), weight_decay
                )
                projected += hit
            values[i] = new
    out = [
        torch.tensor(v, dtype=torch.float64).reshape(p.shape)
        for v, p in zip(values, params, strict=True)
    ]
    return out, projected


def ref_direct_relationship(logits: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """R[c][k] = mean over the rows of class c of softmax(logits row)[k], with loops."""
    import math

    rows: list[list[float]] = []
    for c in range(num_classes):
        acc: list[float] = [0.0] * logits.shape[1]
        count = 0
        for row, label in zip(logits.tolist(), labels.tolist(), strict=True):
            if label != c:
                continue
            exps = [math.exp(v) for v in row]
            acc = [a + e / sum(exps) for a, e in zip(acc, exps, strict=True)]
            count += 1
        rows.append([a / count for a in acc])
    return torch.tensor(rows, dtype=torch.float64)


def ref_bayes_relationship(weight: Tensor, scale: float, source_probs: Tensor) -> Tensor:
    """R[c][k] = Q[k][c] m[k] / sum_k' Q[k'][c] m[k'] with Q[k] = softmax(scale * weight[:, k])
    and m the mean of ``source_probs`` rows, written out with loops."""
    import math

    num_classes, num_source = weight.shape
    m = [sum(col) / source_probs.shape[0] for col in zip(*source_probs.tolist(), strict=True)]
    q = []
    for k in range(num_source):
        exps = [math.exp(scale * float(weight[c, k])) for c in range(num_classes)]
        q.append([e / sum(exps) for e in exps])
    rows = []
    for c in range(num_classes):
        joint = [q[k][c] * m[k] for k in range(num_source)]
        rows.append([j / sum(joint) for j in joint])
    return torch.tensor(rows, dtype=torch.float64)


def ref_cotuning_loss(logits: Tensor, labels: Tensor, relationship: Tensor) -> Tensor:
    """-1/B * sum_b sum_k R[y_b][k] * log softmax(z_b)[k], with loops."""
    import math

    total = 0.0
    for row, label in zip(logits.tolist(), labels.tolist(), strict=True):
        log_norm = math.log(sum(math.exp(v) for v in row))
        for k, v in enumerate(row):
            total -= float(relationship[label, k]) * (v - log_norm)
    return torch.tensor(total / logits.shape[0], dtype=torch.float64)


# --- token (B, N, C) and channels-last (B, H, W, C) references ---


def ref_delta_penalty_tokens(
    source: dict[str, Tensor],
    target: dict[str, Tensor],
    weights: dict[str, Tensor] | None = None,
    reduction: str = "sum",
) -> Tensor:
    """sum_l 1/2 sum_b sum_j C * w[l,j] * (1/N) sum_n (t[b,n,j] - s[b,n,j])^2  (/B when 'mean')."""
    total = torch.zeros((), dtype=torch.float64)
    for name in target:
        t, s = target[name].double(), source[name].double()
        b_size, tokens, channels = t.shape
        layer = torch.zeros((), dtype=torch.float64)
        for b in range(b_size):
            for j in range(channels):
                sq = torch.zeros((), dtype=torch.float64)
                for n in range(tokens):
                    sq = sq + (t[b, n, j] - s[b, n, j]) ** 2
                wj = 1.0 / channels if weights is None else float(weights[name][j])
                layer = layer + channels * wj * sq / tokens
        layer = 0.5 * layer
        if reduction == "mean":
            layer = layer / b_size
        total = total + layer
    return total


def ref_delta_penalty_channels_last(
    source: dict[str, Tensor],
    target: dict[str, Tensor],
    weights: dict[str, Tensor] | None = None,
    reduction: str = "sum",
) -> Tensor:
    """ref_delta_penalty of (B, H, W, C) maps: channel j is [b, :, :, j], moved to axis 1."""

    def bchw(maps: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: m.permute(0, 3, 1, 2) for name, m in maps.items()}  # (B, C, H, W)

    return ref_delta_penalty(bchw(source), bchw(target), weights, reduction)


def ref_removal_scores_last_axis(
    model: torch.nn.Module, batches: list[tuple[Tensor, Tensor]], layers: list[str]
) -> dict[str, Tensor]:
    """ref_removal_scores for layers whose channels are the LAST axis ((B, N, C), (B, H, W, C)).

    Removing channel j zeroes out[..., j]: feature j at every token or position. A module that
    returns a tuple (Hugging Face blocks) has its map first: that element is zeroed.
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
                for j in range(_last_axis_size(modules[name], model, x)):

                    def zero_feature(
                        module: torch.nn.Module, args: object, out: Any, j: int = j
                    ) -> Any:
                        rest = out[1:] if isinstance(out, tuple) else None
                        zeroed = (out[0] if rest is not None else out).clone()
                        zeroed[..., j] = 0
                        return zeroed if rest is None else (zeroed, *rest)

                    handle = modules[name].register_forward_hook(zero_feature)
                    try:
                        logits = model(x)
                    finally:
                        handle.remove()
                    deltas.append(torch.nn.functional.cross_entropy(logits, y) - base)
                per_batch.append(torch.stack(deltas))
            scores[name] = torch.stack(per_batch).mean(dim=0)
    return scores


def _last_axis_size(module: torch.nn.Module, model: torch.nn.Module, x: Tensor) -> int:
    seen: list[int] = []

    def size(m: torch.nn.Module, a: object, out: Any) -> None:
        seen.append((out[0] if isinstance(out, tuple) else out).shape[-1])

    handle = module.register_forward_hook(size)
    try:
        model(x)
    finally:
        handle.remove()
    return seen[0]
