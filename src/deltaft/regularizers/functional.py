"""Regularizer maths as pure functions of tensors.

Every function here is differentiable with respect to its *target* argument(s) only: source
feature maps and reference weights are detached. Shapes: ``B`` batch, ``C`` channels, ``H x W``
spatial size, ``N`` tokens. Feature maps come in three layouts (:data:`deltaft.layers.Layout`):
``"BCHW"``, channels-last ``"BHWC"`` and tokens ``"BNC"``; the positions (``H x W`` or ``N``)
play the same role in each.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from deltaft.layers import Layout, layout_of
from deltaft.layouts import PrefixTokens, prefix_count

__all__ = [
    "bss_penalty",
    "delta_penalty",
    "distillation_penalty",
    "feature_map_penalty",
    "l2_penalty",
    "l2sp_penalty",
]

Reduction = Literal["sum", "mean"]
Layouts = Mapping[str, Layout] | Layout | None


def _check_reduction(reduction: str) -> None:
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}.")


def _check_maps(
    source: Mapping[str, Tensor],
    target: Mapping[str, Tensor],
    layouts: Layouts,
    prefix_tokens: PrefixTokens = 0,
) -> dict[str, tuple[Layout, int]]:
    """The layout and prefix-token count of every layer, after checking that the maps pair up
    and fit them."""
    if set(source) != set(target):
        raise ValueError(
            f"source and target must have the same layers; source has {sorted(source)}, "
            f"target has {sorted(target)}."
        )
    found: dict[str, tuple[Layout, int]] = {}
    for name, t in target.items():
        s = source[name]
        if s.shape != t.shape:
            raise ValueError(
                f"Layer {name!r}: expected source and target maps of the same shape, got "
                f"source {tuple(s.shape)} and target {tuple(t.shape)}."
            )
        layout = layout_of(name, t.shape, layouts)
        found[name] = layout, prefix_count(name, layout, t.shape, prefix_tokens, list(target))
    return found


def _tokens_kept(source: Tensor, target: Tensor, prefix: int) -> tuple[Tensor, Tensor]:
    """``(B, N, C)`` maps without their first ``prefix`` tokens; the maps as given for 0."""
    if prefix == 0:
        return source, target
    return source[:, prefix:], target[:, prefix:]  # (B, N - P, C)


def _channel_sq_error(source: Tensor, target: Tensor, layout: Layout) -> Tensor:
    """Per sample and channel mean over positions of the squared difference, shape ``(B, C)``."""
    diff = target - source.detach()
    if layout == "BCHW":
        return diff.pow(2).flatten(2).mean(dim=2)  # (B, C, H*W) -> (B, C)
    if layout == "BHWC":
        return diff.pow(2).flatten(1, 2).mean(dim=1)  # (B, H*W, C) -> (B, C)
    return diff.pow(2).mean(dim=1)  # BNC: (B, N, C) -> (B, C)


def delta_penalty(
    source: Mapping[str, Tensor],
    target: Mapping[str, Tensor],
    weights: Mapping[str, Tensor] | None = None,
    reduction: Reduction = "sum",
    layouts: Layouts = None,
    prefix_tokens: PrefixTokens = 0,
) -> Tensor:
    r"""DELTA's attention-weighted feature-map distance :math:`\Omega'`.

    For every layer ``l``, with ``P`` the positions of its maps (``H x W`` for ``(B, C, H, W)``
    and ``(B, H, W, C)`` maps, the ``N`` tokens of ``(B, N, C)`` maps) and ``FM[b, p, j]`` the
    value of channel ``j`` at position ``p``::

        D[b, j]  = 1/|P| * sum_p (target[l][b, p, j] - source[l][b, p, j])^2
        Omega'_l = 1/2 * sum_b sum_j C * w[l, j] * D[b, j]
        Omega'   = sum_l Omega'_l                  (reduction="sum", the reference code's)
        Omega'   = sum_l Omega'_l / B              (reduction="mean")

    ``w[l, :]`` sums to 1, so uniform attention (``weights=None``, ``w = 1/C``) multiplies each
    channel by exactly 1. The published ``alpha = 0.01`` pairs with ``"sum"`` at batch 64.

    Args:
        source: frozen source maps by layer name; detached here.
        target: the fine-tuned network's maps, same names and shapes.
        weights: per-layer channel attention ``(C,)`` summing to 1; ``None`` for uniform.
        reduction: ``"sum"`` over the batch (reference) or ``"mean"`` (divide by ``B``).
        layouts: ``"BCHW"``, ``"BHWC"`` or ``"BNC"`` for every layer, or a mapping by layer
            name; ``None``: by rank, ``"BCHW"`` for 4-D maps and ``"BNC"`` for 3-D maps
            (channels-last maps must be declared: read as ``"BCHW"`` their rows would be
            weighted as channels). :func:`deltaft.layers.detect_layouts` finds them.
        prefix_tokens: leading tokens ``P`` of ``(B, N, C)`` maps (class, distillation,
            register tokens) to leave out: the positions are then the tokens ``n >= P`` and
            ``|P| = N - P``. An ``int`` for every token layer (ignored for 4-D maps) or a mapping
            by layer name; 0 (default) keeps every token.
            :func:`deltaft.layouts.declared_prefix_tokens` reads a model's count.

    Returns:
        A scalar tensor; gradients flow to ``target`` only.

    Example:
        >>> s = {"conv": torch.zeros(2, 3, 4, 4)}
        >>> t = {"conv": torch.ones(2, 3, 4, 4)}
        >>> delta_penalty(s, t)  # 1/2 * 2 samples * 3 channels * 1
        tensor(3.)
        >>> tokens = {"blocks.11": torch.ones(2, 5, 3)}  # (B, N, C)
        >>> delta_penalty({"blocks.11": torch.zeros(2, 5, 3)}, tokens, layouts="BNC")
        tensor(3.)
    """
    _check_reduction(reduction)
    found = _check_maps(source, target, layouts, prefix_tokens)
    total: Tensor | None = None
    for name, t in target.items():
        layout, prefix = found[name]
        d = _channel_sq_error(*_tokens_kept(source[name], t, prefix), layout)  # (B, C)
        channels = d.shape[1]
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
    layouts: Layouts = None,
    prefix_tokens: PrefixTokens = 0,
) -> Tensor:
    r"""The reference code's "without attention" penalty (method ``fm``).

    ::

        Omega = sum_l 1/2 * ||target[l] - source[l]||_F^2        (reduction="sum")
        Omega = sum_l 1/2 * ||target[l] - source[l]||_F^2 / B    (reduction="mean")

    summed over every element: no ``/(H*W)`` and no channel weighting, so it is ``H*W`` times
    larger per layer than :func:`delta_penalty` with uniform attention (``N`` times for tokens).
    The value does not depend on the layout; ``layouts`` (as in :func:`delta_penalty`) is
    checked against each map's rank. ``prefix_tokens`` (as in :func:`delta_penalty`) leaves the
    first ``P`` tokens of ``(B, N, C)`` maps out of the sum.

    Example:
        >>> s = {"conv": torch.zeros(2, 3, 4, 4)}
        >>> t = {"conv": torch.ones(2, 3, 4, 4)}
        >>> feature_map_penalty(s, t)  # 1/2 * 96 elements
        tensor(48.)
    """
    _check_reduction(reduction)
    found = _check_maps(source, target, layouts, prefix_tokens)
    total: Tensor | None = None
    for name, t in target.items():
        kept_s, kept_t = _tokens_kept(source[name], t, found[name][1])
        term = 0.5 * (kept_t - kept_s.detach()).pow(2).sum()
        if reduction == "mean":
            term = term / t.shape[0]
        total = term if total is None else total + term
    if total is None:
        raise ValueError("feature_map_penalty needs at least one layer; got empty inputs.")
    return total


def _squared_norms(tensors: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """``||t||^2`` of every tensor, shape ``(N,)``.

    On CUDA one fused multi-tensor kernel, ``torch._foreach_norm``, squared. Elsewhere each tensor
    is squared and summed: CPU's norm kernel accumulates a long float32 vector with 3e-3 relative
    error on a 2.4 M-element ResNet-50 weight (torch 2.14, measured), its sum is cascaded (5e-7).
    """
    if all(t.is_cuda for t in tensors):
        return torch.stack(torch._foreach_norm(tensors)).square()
    return torch.stack([t.square().sum() for t in tensors])


class _L2SP(torch.autograd.Function):
    """``1/2 * sum_n ||p_n - r_n||^2`` as one autograd node with multi-tensor kernels.

    The per-parameter graph (sub, pow, sum per tensor, then stack) runs ~8 small ops per tensor
    through autograd and re-reads every parameter several times; on ResNet-50 (161 tensors) it
    made a step 1.46x a plain one (benchmarks/README.md). Here the forward is ``_foreach_sub``
    plus one squared-norm reduction; the backward scales the saved differences in place
    (``_foreach_mul_``) and returns them as the gradients: one pass, no new allocation.
    ``apply(refs, *params)``: the references are a plain list, not inputs, so they get no
    gradient and autograd does no per-tensor bookkeeping for them.
    """

    @staticmethod
    def forward(ctx: Any, refs: list[Tensor], *params: Tensor) -> Tensor:
        diffs = torch._foreach_sub(params, refs)  # p_n - r_n, dtype promoted as by `-`
        needs = ctx.needs_input_grad[1:]
        # Inputs, for a repeated or differentiable backward: no memory, and in-place changes to
        # a parameter before such a backward raise instead of giving a wrong gradient.
        ctx.save_for_backward(*params)
        ctx.refs = refs
        # The differences of parameters that get a gradient: as much memory as the saved input
        # of the per-parameter graph's `pow`. Kept on ctx, not saved, because backward overwrites
        # them (saved-tensor hooks, e.g. CPU offloading, therefore do not see them).
        ctx.diffs = [d if need else None for d, need in zip(diffs, needs, strict=True)]
        return 0.5 * _squared_norms(diffs).sum()

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        diffs: list[Tensor | None] | None = ctx.diffs
        ctx.diffs = None  # the buffers become the gradients; a second backward recomputes
        grads: list[Tensor | None]
        if diffs is None or torch.is_grad_enabled():
            # backward after `retain_graph=True`, or `create_graph=True` (double backward):
            # recompute from the inputs with ordinary, differentiable ops.
            needs = ctx.needs_input_grad[1:]
            grads = [
                grad_out * (p - r) if need else None
                for p, r, need in zip(ctx.saved_tensors, ctx.refs, needs, strict=True)
            ]
        else:
            torch._foreach_mul_([d for d in diffs if d is not None], grad_out)
            grads = diffs
        return (None, *grads)


def l2sp_penalty(params: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> Tensor:
    r"""L2-SP: ``1/2 * sum_{n in reference} ||params[n] - reference[n]||^2``.

    Only the names in ``reference`` count (the pre-trained parameters); ``reference`` is detached.
    The gradient with respect to ``params[n]`` is ``params[n] - reference[n]``. Computed with
    multi-tensor (``torch._foreach``) kernels in one autograd node; on CUDA each sum of squares
    is a squared norm, so float32 values may differ from ``.pow(2).sum()`` in the last bits.

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
    if not reference:
        return torch.zeros(())
    # detach() is a dispatched op; skip it where there is nothing to cut (161x on ResNet-50)
    refs = [r.detach() if r.requires_grad else r for r in reference.values()]
    out: Tensor = _L2SP.apply(refs, *[params[n] for n in reference])
    return out


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


# --- Batch Spectral Shrinkage (Chen et al., NeurIPS 2019) ---


def _check_bss_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}.")


def bss_penalty(features: Tensor, k: int = 1) -> Tensor:
    r"""Batch Spectral Shrinkage: the squared ``k`` smallest singular values of the features.

    Chen et al., "Catastrophic Forgetting Meets Negative Transfer: Batch Spectral Shrinkage for
    Safe Transfer Learning", NeurIPS 2019. With ``sigma_1 >= ... >= sigma_n`` the singular values
    of the feature matrix ``features`` of shape ``(B, D)``, ``n = min(B, D)``::

        bss = sum_{i=n-k+1..n} sigma_i^2        (the k smallest, squared, summed)

    No strength inside: the caller multiplies by ``eta`` (0.001 in the authors' code).
    This is what the authors' ``BSS.py`` (thuml/Batch-Spectral-Shrinkage) and the peer's
    ``tllib/regularization/bss.py`` compute: ``torch.svd(feature.t())`` of the pooled
    ``(B, D)`` classifier input (B = 48, D = 2048 for ResNet-50), then
    ``sum(s[n - 1 - i] ** 2 for i in range(k))`` with ``k = 1``, loss ``CE + 0.001 * bss``.
    The transpose does not change the singular values; here they come from
    :func:`torch.linalg.svdvals` (no singular vectors are formed). Differences: the SVD runs in
    float32 when ``features`` is half precision or bfloat16 (which have no SVD kernels), and
    ``k > n`` is an error where the authors' loop would silently wrap to the largest values.

    Args:
        features: the batch's feature matrix ``(B, D)``, e.g. the classifier's pooled input.
        k: how many of the smallest singular values to shrink, ``1 <= k <= min(B, D)``.

    Returns:
        A scalar tensor, float64 for float64 input and float32 otherwise; gradients flow to
        ``features`` (through the cast when it is cast up).

    Example:
        >>> bss_penalty(torch.diag(torch.tensor([3.0, 2.0, 0.5])))  # 0.5^2
        tensor(0.2500)
        >>> bss_penalty(torch.diag(torch.tensor([3.0, 2.0, 0.5])), k=2)  # 2^2 + 0.5^2
        tensor(4.2500)
    """
    _check_bss_k(k)
    if features.dim() != 2:
        raise ValueError(
            f"bss_penalty expects a (B, D) feature matrix, got shape {tuple(features.shape)}; "
            "flatten the features with features.flatten(1)."
        )
    batch, dim = features.shape
    if min(batch, dim) < k:
        raise ValueError(
            f"BSS with k={k} needs at least {k} samples and {k} feature dimensions, got a "
            f"({batch}, {dim}) feature matrix; use a larger batch or a smaller k."
        )
    work = features if features.dtype == torch.float64 else features.float()
    sigma = torch.linalg.svdvals(work)  # (min(B, D),), descending
    return sigma[-k:].square().sum()


# --- LwF distillation (Li & Hoiem 2016, as Hinton et al. 2015 scale it) ---


def distillation_penalty(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float
) -> Tensor:
    r"""Knowledge-distillation penalty of LwF: ``T^2 * KL(p_teacher || p_student)``, batch mean.

    With logits of shape ``(B, K)`` and temperature ``T``::

        p[b, k] = softmax(teacher_logits[b] / T)[k]          (teacher detached)
        q[b, k] = softmax(student_logits[b] / T)[k]
        penalty = T^2 / B * sum_b sum_k p[b, k] * (log p[b, k] - log q[b, k])

    Li & Hoiem, "Learning without Forgetting" (ECCV 2016 / TPAMI 2017), keep the source head and
    distil the frozen source's softened outputs into it. The ``T^2`` factor (Hinton et al. 2015)
    keeps the gradient's scale independent of ``T``: the gradient with respect to
    ``student_logits[b]`` is ``T / B * (q[b] - p[b])``. The peer library's
    ``KnowledgeDistillationLoss`` (thuml/Transfer-Learning-Library; ``T=3``, trade-off 4) is the
    same KL *without* ``T^2``: its trade-off ``a`` equals ``a / T^2`` here.

    Args:
        student_logits: the fine-tuned network's source-head logits, ``(B, K)``.
        teacher_logits: the frozen source network's logits for the same inputs, ``(B, K)``.
        temperature: ``T > 0``, finite.

    Returns:
        A scalar tensor, ``>= 0``; gradients flow to ``student_logits`` only.

    Example:
        >>> z = torch.tensor([[1.0, 2.0, 3.0]])
        >>> distillation_penalty(z, z, temperature=2.0)
        tensor(0.)
    """
    if isinstance(temperature, bool) or not 0 < temperature < float("inf"):  # NaN fails too
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "Expected student and teacher logits of the same (B, K) shape, got student "
            f"{tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}."
        )
    if student_logits.shape[0] == 0:
        raise ValueError("distillation_penalty needs a non-empty batch; got B = 0.")
    log_q = torch.log_softmax(student_logits / temperature, dim=1)  # (B, K)
    log_p = torch.log_softmax(teacher_logits.detach() / temperature, dim=1)  # (B, K)
    kl = torch.nn.functional.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    return kl * temperature**2
