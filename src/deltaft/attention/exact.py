"""``method="exact"``: removal scores from the fx replay, or from batched full forwards.

Internal to :mod:`deltaft.attention`. Per batch, one full forward caches what each layer's
downstream part reads (:class:`~deltaft.attention.replay.GraphReplay`); the downstream part alone
then runs on ``K`` masked replicas of the layer's output, ``K`` channels per replay. A model that
fx cannot trace, or a layer whose replay fails, is scored with batched full forwards instead: the
input repeated ``K`` times, the layer's output masked by a hook. Both give the reference's numbers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, fx, nn

from deltaft._probe import output_map, replace_map
from deltaft._utils import first_line
from deltaft._utils import logits_of as _logits
from deltaft.attention._common import Batch, LossFn, batch_loss
from deltaft.attention.replay import GraphReplay, channel_masks, mask_replicas, replica_losses
from deltaft.layers import Layout, channel_axis

__all__ = ["exact_scores"]

logger = logging.getLogger(__name__)

# Default chunk: K replicas of the largest activation a replay computes take about this many
# bytes. Small on the CPU, where large batches run slower per sample (measured on ResNet-50 and
# MobileNetV2 at 64 px: 8 MiB is near the best for both); large on accelerators.
_CHUNK_BYTES = {"cpu": 8 * 2**20}
_CHUNK_BYTES_ACCELERATOR = 256 * 2**20


def _batched_forward_logits(
    model: nn.Module, module: nn.Module, name: str, x: Tensor, mask: Tensor
) -> Tensor:
    """Logits ``(K*B, N)`` of ``model`` on ``x`` repeated K times, replica k without channel k."""
    k = mask.shape[0]

    def hook(mod: nn.Module, args: Any, output: Any) -> Any:
        found = cast(Tensor, output_map(output))  # a tuple's first element is the map
        if found.shape[0] != k * x.shape[0]:
            raise ValueError(
                f"Layer {name!r} returned a batch of {found.shape[0]} for an input batch of "
                f"{k * x.shape[0]}; the exact method needs a model that treats samples "
                "independently. Use method='reference' for this model."
            )
        return replace_map(output, mask_replicas(found, mask))

    handle = module.register_forward_hook(hook)
    try:
        return _logits(model(x.repeat(k, *([1] * (x.dim() - 1)))))  # input (K*B, ...)
    finally:
        handle.remove()


def _keep_prefix(mask: Tensor, prefix: int, tokens: int) -> Tensor:
    """``mask`` ``(K, 1, 1, C)`` of a ``(B, N, C)`` layer widened to ``(K, 1, N, C)`` with its first
    ``prefix`` tokens all ones (no channel removed there); ``mask`` itself when ``prefix`` is 0.
    Built per chunk of ``K`` channels: ``K * N * C`` values, a ``B``-th of the replicas' map."""
    if not prefix:
        return mask
    wide = mask.expand(mask.shape[0], 1, tokens, mask.shape[-1]).clone()  # (K, 1, N, C)
    wide[:, :, :prefix] = 1
    return wide


def _trace(model: nn.Module, modules: Mapping[str, nn.Module]) -> GraphReplay | None:
    try:
        return GraphReplay(model, modules)
    except Exception as error:  # fx raises many exception types on untraceable Python
        logger.warning(
            "torch.fx cannot trace %s (%s: %s); scoring with batched full forwards instead "
            "(still exact, but without reusing the computation upstream of each layer).",
            type(model).__name__,
            type(error).__name__,
            first_line(error),
        )
        return None


def _default_chunk(channels: int, per_replica: int, device: torch.device) -> int:
    """Channels per chunk: ``K * per_replica`` bytes stay within the device's budget."""
    budget = _CHUNK_BYTES.get(device.type, _CHUNK_BYTES_ACCELERATOR)
    return max(1, min(channels, budget // max(per_replica, 1)))


def exact_scores(
    model: nn.Module,
    batches: Sequence[Batch],
    modules: Mapping[str, nn.Module],
    shapes: Mapping[str, tuple[int, ...]],
    layouts: Mapping[str, Layout],
    loss_fn: LossFn | None,
    device: torch.device,
    chunk_size: int | None,
    progress: Any,
    prefixes: Mapping[str, int] | None = None,
) -> dict[str, Tensor]:
    """Sum over batches of the ``(C,)`` loss increases, per layer (on ``device``).

    ``progress`` (a tqdm bar) advances by the number of channels scored. ``prefixes``: leading
    tokens of ``(B, N, C)`` layers that no replica zeroes (see :func:`_keep_prefix`).
    """
    replay = _trace(model, modules)
    for name in modules:
        if replay is not None and name not in replay.plans:
            logger.warning(
                "Layer %r is inside another layer that fx keeps whole; scoring it with batched "
                "full forwards.",
                name,
            )
    totals: dict[str, Tensor] = {}
    masks: dict[str, Tensor] = {}
    for x_cpu, y_cpu in batches:
        x, y = x_cpu.to(device), y_cpu.to(device)
        output, snaps, replay = _full_forward(model, replay, x)
        logits = _logits(output)
        base = batch_loss(logits, y, loss_fn)
        for name, module in modules.items():
            channels = shapes[name][channel_axis(layouts[name])]
            if name not in masks:
                masks[name] = channel_masks(channels, logits.dtype, device, layouts[name])
            keep = (prefixes or {}).get(name, 0), shapes[name][1]  # (P, N) of a BNC layer
            deltas = None
            if replay is not None and name in replay.plans:
                deltas = _replay_or_none(
                    replay,
                    name,
                    snaps[name],
                    masks[name],
                    chunk_size,
                    y,
                    base,
                    loss_fn,
                    progress,
                    keep,
                )
            if deltas is None:
                per_replica = math.prod(shapes[name]) * logits.element_size()
                chunk = chunk_size or _default_chunk(channels, per_replica, device)
                deltas = _forward_deltas(
                    model, module, name, x, y, base, masks[name], chunk, loss_fn, progress, keep
                )
            totals[name] = totals[name] + deltas if name in totals else deltas
    return totals


def _replay_or_none(
    replay: GraphReplay,
    name: str,
    snaps: Mapping[fx.Node, Any],
    masks: Tensor,
    chunk_size: int | None,
    y: Tensor,
    base: Tensor,
    loss_fn: LossFn | None,
    progress: Any,
    keep: tuple[int, int],
) -> Tensor | None:
    """:func:`_replay_deltas`, or ``None`` (the layer's plan dropped) when the replay fails."""
    chunk = chunk_size or _default_chunk(masks.shape[0], replay.peak_bytes(name), masks.device)
    done = progress.n
    try:
        return _replay_deltas(replay, name, snaps, masks, chunk, y, base, loss_fn, progress, keep)
    except Exception as error:
        logger.warning(
            "Replaying the layers downstream of %r on batched replicas failed "
            "(%s: %s); scoring it with batched full forwards instead.",
            name,
            type(error).__name__,
            first_line(error),
        )
        progress.update(done - progress.n)  # the batched forwards score these channels again
        replay.drop(name)
        return None


def _replay_deltas(
    replay: GraphReplay,
    name: str,
    snaps: Mapping[fx.Node, Any],
    masks: Tensor,
    chunk: int,
    y: Tensor,
    base: Tensor,
    loss_fn: LossFn | None,
    progress: Any,
    keep: tuple[int, int],
) -> Tensor:
    """``(C,)`` loss increases of one layer on one batch, from the downstream replay."""
    if not replay.plans[name].affects_output:  # no channel of this layer reaches the output
        progress.update(masks.shape[0])
        return torch.zeros(masks.shape[0], dtype=masks.dtype, device=masks.device)
    parts = []
    for start in range(0, masks.shape[0], chunk):
        mask = _keep_prefix(masks[start : start + chunk], *keep)  # (K, 1, ...): channel_masks
        logits = _logits(replay.replay(name, snaps, mask, y.shape[0]))  # (K*B, N)
        parts.append(replica_losses(logits, y, mask.shape[0], loss_fn) - base)
        progress.update(mask.shape[0])
    return torch.cat(parts)


def _forward_deltas(
    model: nn.Module,
    module: nn.Module,
    name: str,
    x: Tensor,
    y: Tensor,
    base: Tensor,
    masks: Tensor,
    chunk: int,
    loss_fn: LossFn | None,
    progress: Any,
    keep: tuple[int, int],
) -> Tensor:
    """``(C,)`` loss increases of one layer on one batch, from batched full forwards."""
    parts = []
    for start in range(0, masks.shape[0], chunk):
        mask = _keep_prefix(masks[start : start + chunk], *keep)  # (K, 1, ...): channel_masks
        logits = _batched_forward_logits(model, module, name, x, mask)  # (K*B, N)
        parts.append(replica_losses(logits, y, mask.shape[0], loss_fn) - base)
        progress.update(mask.shape[0])
    return torch.cat(parts)


def _full_forward(
    model: nn.Module, replay: GraphReplay | None, x: Tensor
) -> tuple[Any, dict[str, dict[fx.Node, Any]], GraphReplay | None]:
    """The model's output on ``x``, with the replay cache when the trace runs (else ``None``)."""
    if replay is not None:
        try:
            output, snaps = replay.run(x)
            return output, snaps, replay
        except Exception as error:
            logger.warning(
                "Running the fx trace of %s failed (%s: %s); scoring with batched full forwards "
                "instead.",
                type(model).__name__,
                type(error).__name__,
                first_line(error),
            )
    return model(x), {}, None
