"""The reference procedure: train a new head on the frozen source, score its channels, normalise."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from deltaft._utils import dtype_device
from deltaft._utils import logits_of as _logits
from deltaft.attention._common import (
    Method,
    as_pair,
    check_method,
    check_n_batches,
    check_temperature,
    take_batches,
)
from deltaft.attention.fingerprint import batches_fingerprint, model_fingerprint
from deltaft.attention.scores import attention_from_scores, channel_removal_scores
from deltaft.attention.value import ChannelAttention
from deltaft.heads import replace_head
from deltaft.layers import Layout, resolve_layers
from deltaft.layouts import PrefixTokens

__all__ = [
    "REFERENCE_LR_GAMMA",
    "BatchNormMode",
    "estimate_channel_attention",
    "train_linear_probe",
]

logger = logging.getLogger(__name__)

BatchNormMode = Literal["adapt", "frozen"]

_BN_MODES: tuple[str, ...] = ("adapt", "frozen")

#: The reference's per-epoch lr factor of the attention head: x0.1 after 6 epochs.
REFERENCE_LR_GAMMA = 0.1 ** (1 / 6)


def train_linear_probe(
    source: nn.Module,
    loader: Iterable[Any],
    num_classes: int,
    *,
    epochs: int = 10,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    lr_gamma: float = REFERENCE_LR_GAMMA,
    bn: BatchNormMode = "frozen",
    head: str | None = None,
    device: torch.device | str | None = None,
    log_as: str = "linear probe",
) -> nn.Module:
    """A copy of ``source`` with a new head trained on ``loader``, everything else frozen.

    Step 1 of :func:`estimate_channel_attention`, and the linear probe of LP-FT (Kumar et al.,
    ICLR 2022): the head is replaced with a new ``nn.Linear(in_features, num_classes)`` (its
    initial weights drawn from torch's global RNG), every other parameter is frozen
    (``requires_grad_(False)``), and the head is trained for ``epochs`` epochs over ``loader``
    with cross-entropy (batch mean) and ``SGD(lr, momentum, weight_decay)``; the lr of epoch
    ``e`` (from 0) is ``lr * lr_gamma ** e``. With ``bn="frozen"`` (the default) the copy runs
    in eval mode, so the backbone's parameters and buffers stay bit-identical; with
    ``bn="adapt"`` (the attention reference) it runs in train mode, so BatchNorm running
    statistics follow the target data (and dropout is active). ``source`` is never modified.
    Each epoch's mean loss is logged (INFO) as ``"<log_as>: epoch e/E, loss L, lr R"``.

    Returns:
        The copy, in eval mode, its head's parameters still requiring grad.

    Raises:
        ValueError: ``loader`` yielded no batch.
    """
    model = copy.deepcopy(source)
    if device is not None:
        model.to(device)
    model.requires_grad_(False)
    head_name = replace_head(model, num_classes, head)  # the new nn.Linear requires grad
    params = list(model.get_submodule(head_name).parameters())
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    # The reference's schedule: ExponentialLR stepped once per epoch (x0.1 after 6 epochs by
    # default, smoothly), not a StepLR.
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=lr_gamma)
    # "adapt": the frozen backbone runs in train mode, so BatchNorm statistics follow the target
    # data (and dropout is active), as in the reference code. "frozen": eval mode throughout.
    model.train(bn == "adapt")
    _, model_device = dtype_device(model)
    for epoch in range(epochs):
        total, count = torch.zeros((), device=model_device), 0
        for batch in loader:
            x, y = as_pair(batch)
            loss = F.cross_entropy(_logits(model(x.to(model_device))), y.to(model_device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            count += 1
        if count == 0:
            raise ValueError(
                "The loader yielded no batches; expected (x, y) batches of target data."
            )
        logger.info(
            "%s: epoch %d/%d, loss %.4f, lr %.3g",
            log_as,
            epoch + 1,
            epochs,
            float(total) / count,
            optimizer.param_groups[0]["lr"],
        )
        scheduler.step()
    return model.eval()


def estimate_channel_attention(
    source: nn.Module,
    loader: Iterable[Any],
    layers: Sequence[str],
    num_classes: int,
    *,
    epochs: int = 10,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    lr_gamma: float = REFERENCE_LR_GAMMA,
    bn: BatchNormMode = "adapt",
    n_batches: int = 4,
    temperature: float = 5.0,
    method: Method = "exact",
    head: str | None = None,
    device: torch.device | str | None = None,
    score_loader: Iterable[Any] | None = None,
    progress: bool = False,
    layouts: Mapping[str, Layout] | Layout | None = None,
    prefix_tokens: PrefixTokens = 0,
    on_probe: Callable[[nn.Module], None] | None = None,
) -> ChannelAttention:
    """DELTA's supervised channel attention for ``source`` on the target data.

    The reference procedure, on a deep copy (``source`` itself is never modified):

    1. Replace the head with a new ``nn.Linear(in_features, num_classes)``, freeze every other
       parameter (``requires_grad_(False)``) and train the head for ``epochs`` epochs over
       ``loader``: cross-entropy, ``SGD(lr, momentum, weight_decay)``, the lr of epoch ``e``
       (from 0) is ``lr * lr_gamma ** e`` (the reference's ``ExponentialLR``, stepped once per
       epoch; the default ``lr_gamma = 0.1 ** (1 / 6)`` gives x0.1 after 6 epochs).
       With ``bn="adapt"`` (reference) the frozen backbone runs in train mode, so BatchNorm
       running statistics adapt to the target data; with ``bn="frozen"`` everything runs in
       eval mode.
    2. ``delta = channel_removal_scores(copy, first n_batches of score_loader or loader)``.
    3. ``w = attention_from_scores(delta, temperature)``.

    Args:
        source: the pre-trained network (with its original head).
        loader: target training batches ``(x, y)``, ``y`` in ``[0, num_classes)``.
        layers: dotted names of the modules to weight; outputs ``(B, C, H, W)``, channels-last
            ``(B, H, W, C)`` or tokens ``(B, N, C)``.
        num_classes: number of target classes.
        epochs, lr, momentum, weight_decay: the head's training schedule.
        lr_gamma: the lr's factor per epoch, in ``(0, 1]`` (``1`` keeps it constant).
        bn: ``"adapt"`` or ``"frozen"``, see above.
        n_batches: batches the removal scores average over.
        temperature: softmax temperature ``T``.
        method: see :func:`~deltaft.attention.channel_removal_scores`; ``"exact"`` by default.
        head: the head's dotted name; found with :func:`~deltaft.heads.find_head` when ``None``.
        device: where to train and score; default the device of ``source``.
        score_loader: batches to score on; default ``loader`` (use a non-shuffled loader to
            make the result reproducible).
        progress: show a progress bar on stderr while the channels are scored (see
            :func:`~deltaft.attention.channel_removal_scores`).
        layouts: the layers' layouts, one for all or by name (``"BCHW"``, ``"BHWC"``,
            ``"BNC"``), e.g. from :func:`~deltaft.layers.check_layers`, so that the scores and
            :class:`~deltaft.objective.TransferObjective` read the same axis; ``None``: detected
            by :func:`~deltaft.attention.channel_removal_scores`.
        prefix_tokens: leading tokens of ``(B, N, C)`` maps that are not scored (see
            :func:`~deltaft.attention.channel_removal_scores`); pass the objective's value.
        on_probe: called with the copy step 1 trained (the source with its new head, eval
            mode) before its channels are scored, which leave its weights as they are; LP-FT
            keeps that head as its linear probe this way instead of training another.

    Returns:
        A :class:`ChannelAttention` with the source's and the scored batches' fingerprints.

    Raises:
        ValueError: an invalid ``bn``, ``method``, ``epochs``, ``lr_gamma`` or layer name; see also
            :func:`~deltaft.attention.channel_removal_scores`.

    Example:
        >>> import torch, torchvision
        >>> source = torchvision.models.resnet18(num_classes=10)
        >>> data = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))]
        >>> att = estimate_channel_attention(source, data, ["layer4.1.conv2"], 3, epochs=1)
        >>> att.channels
        {'layer4.1.conv2': 512}
    """
    if bn not in _BN_MODES:
        raise ValueError(f"bn must be one of {', '.join(_BN_MODES)}; got {bn!r}.")
    check_method(method)
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}.")
    if not 0 < lr_gamma <= 1:  # also rejects NaN
        raise ValueError(
            f"lr_gamma must be in (0, 1] (the lr's factor per epoch; the reference's is "
            f"0.1 ** (1 / 6) = {REFERENCE_LR_GAMMA:.4f}), got {lr_gamma}."
        )
    check_n_batches(n_batches)  # fail before training
    check_temperature(temperature)
    resolve_layers(source, layers)
    fingerprint = model_fingerprint(source)
    model = train_linear_probe(
        source,
        loader,
        num_classes,
        epochs=epochs,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        lr_gamma=lr_gamma,
        bn=bn,
        head=head,
        device=device,
        log_as="attention head",
    )
    if on_probe is not None:
        on_probe(model)
    batches = take_batches(loader if score_loader is None else score_loader, n_batches)
    scores = channel_removal_scores(
        model,
        batches,
        layers,
        n_batches=len(batches),
        method=method,
        progress=progress,
        layouts=layouts,
        prefix_tokens=prefix_tokens,
    )
    return ChannelAttention(
        weights=attention_from_scores(scores, temperature),
        scores=scores,
        temperature=float(temperature),
        n_batches=len(batches),
        model_fingerprint=fingerprint,
        data_fingerprint=batches_fingerprint(batches),
        method=method,
        prefix_tokens=dict(prefix_tokens) if isinstance(prefix_tokens, Mapping) else prefix_tokens,
    )
