"""Channel removal scores and the attention weights computed from them.

:func:`channel_removal_scores` measures how much the loss grows when one output channel of a layer
is zeroed, by one of three methods: ``"exact"`` (the fx replay of :mod:`~deltaft.attention.exact`),
``"reference"`` (one full forward per channel) or ``"taylor"`` (first-order, one backward per
batch). :func:`attention_from_scores` turns the scores into per-layer softmax weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from tqdm import tqdm

from deltaft._probe import output_map, replace_map
from deltaft._utils import dtype_device, eval_mode
from deltaft._utils import logits_of as _logits
from deltaft.attention._common import (
    Batch,
    LossFn,
    Method,
    batch_loss,
    check_method,
    check_temperature,
    take_batches,
)
from deltaft.attention.exact import exact_scores
from deltaft.attention.taylor import taylor_batch
from deltaft.layers import (
    Layout,
    channel_axis,
    detect_layouts,
    layout_of,
    output_shapes,
    resolve_layers,
)
from deltaft.layouts import PrefixTokens, prefix_count

__all__ = ["attention_from_scores", "channel_removal_scores"]


def channel_removal_scores(
    model: nn.Module,
    loader: Iterable[Any],
    layers: Sequence[str],
    *,
    n_batches: int = 4,
    method: Method = "exact",
    loss_fn: LossFn | None = None,
    device: torch.device | str | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
    layouts: Mapping[str, Layout] | Layout | None = None,
    prefix_tokens: PrefixTokens = 0,
) -> dict[str, Tensor]:
    r"""How much the loss grows when each channel of each layer is removed.

    On the first ``n_batches`` batches ``(x_b, y_b)`` of ``loader``, with ``model`` in eval mode::

        delta[l][j] = 1/n_batches * sum_b ( L(x_b, y_b | output channel j of l set to 0)
                                            - L(x_b, y_b) )
        L = loss_fn(logits, y), by default F.cross_entropy(logits, y) (mean over the batch)

    Removing a channel zeroes channel ``j`` of module ``l``'s output for every sample, at every
    position or token: ``output[:, j]`` of a ``(B, C, H, W)`` map (for a bias-free convolution
    this is the reference's zeroing of filter ``j``), ``output[..., j]`` of a ``(B, H, W, C)`` or
    ``(B, N, C)`` map. With ``prefix_tokens = P`` for a ``(B, N, C)`` layer, channel ``j`` is
    zeroed at the tokens ``n >= P`` only, ``output[:, P:, j]``: the class, distillation and
    register tokens stay, as they stay out of :func:`~deltaft.regularizers.delta_penalty`
    with the same ``prefix_tokens``. ``model``'s modes are restored afterwards and its
    parameters are not changed.

    Methods:

    * ``"exact"`` (default): the same numbers as ``"reference"`` (to float round-off), much faster.
      The model is traced with :mod:`torch.fx` (the layers kept as whole nodes); per batch, one
      forward caches what each layer's downstream part reads, then that part alone is replayed on
      ``K`` replicas of the layer's output (``(K*B, C, H, W)``, replica ``k`` without channel
      ``k``): one replay scores ``K`` channels. Cached activations that the replay reads (e.g. a
      skip connection) are repeated ``K`` times along the axis that carries the samples, found
      once by running the graph on one sample and on that sample twice (a constant or a value
      whose first dimension merely equals the batch size is not repeated). This assumes that
      samples do not interact, true of eval-mode classifiers (BatchNorm uses its running
      statistics). A model fx cannot trace is scored with batched full forwards (a logged
      warning), still exact.
    * ``"reference"``: one full forward per channel per batch with a hook that zeroes the
      channel; slow and obviously correct.
    * ``"taylor"``: approximate, one backward per batch. First-order estimate of the same
      quantity: zeroing channel ``j`` changes ``a = output[:, j]`` by ``-a``, so
      ``delta[l][j] ~ -sum_{b,p} a[b, p, j] * dL/da[b, p, j]`` over samples ``b`` and positions
      or tokens ``p`` (mean over batches).

    Args:
        model: a classifier whose ``forward(x)`` returns logits (or a tuple / an object with
            ``.logits``), already on its device.
        loader: yields ``(x, y)`` batches; only the first ``n_batches`` are read.
        layers: dotted names of modules whose output is a ``(B, C, H, W)``, ``(B, H, W, C)`` or
            ``(B, N, C)`` tensor.
        n_batches: number of batches to average over (fewer if ``loader`` runs out).
        method: ``"exact"``, ``"reference"`` or ``"taylor"``.
        loss_fn: ``(logits, y) -> scalar`` batch-mean loss; default cross-entropy.
        device: where batches go; default the device of the model's parameters.
        chunk_size: channels ``K`` scored per replay (``"exact"``). Default: ``K`` replicas of
            the largest activation the replay computes take about 8 MiB on the CPU (larger
            batches run slower per sample there) and 256 MiB on other devices.
        progress: show a progress bar with an ETA on stderr (tqdm; cleared when done), counting
            ``channels x batches`` scored. Nothing is printed by default.
        layouts: ``"BCHW"``, ``"BHWC"`` or ``"BNC"`` for every layer, or a mapping by layer
            name. ``None`` (default): found by :func:`~deltaft.layers.detect_layouts` from dry
            forwards of one sample of the first batch at its size and at twice its size.
        prefix_tokens: leading tokens of ``(B, N, C)`` maps that are not scored (see above):
            one count for every token layer (ignored for 4-D maps) or a mapping by layer name;
            0 (default) scores every token.

    Returns:
        ``{layer: delta (C,)}`` in the order of ``layers``, on the CPU, in the model's dtype.

    Raises:
        ValueError: an unknown method or layer, ``n_batches < 1``, ``chunk_size < 1``, an empty
            loader, a layer whose output is not 3-D or 4-D, or whose layout cannot be found
            (then pass ``layouts``) or does not match its rank.

    Example:
        >>> import torch, torchvision
        >>> model = torchvision.models.resnet18(num_classes=3)
        >>> data = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))]
        >>> scores = channel_removal_scores(model, data, ["layer4.1.conv2"], n_batches=1)
        >>> scores["layer4.1.conv2"].shape
        torch.Size([512])
    """
    check_method(method)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (or None for automatic), got {chunk_size}.")
    modules = resolve_layers(model, layers)
    batches = take_batches(loader, n_batches)
    dtype, model_device = dtype_device(model)
    device = torch.device(device) if device is not None else model_device
    with eval_mode(model):
        x = batches[0][0].to(device)
        with torch.inference_mode():
            calls = _probe_shapes(model, x, modules)
        shapes = {name: calls[name][0] for name in modules}
        if layouts is None:
            found = detect_layouts(model, list(modules), input_size=x[:1])
        else:
            found = {name: layout_of(name, shapes[name], layouts) for name in modules}
        channels = {name: _channels(name, calls[name], found[name]) for name in modules}
        prefixes = {
            name: prefix_count(name, found[name], shapes[name], prefix_tokens, list(modules))
            for name in modules
        }
        total = sum(channels.values()) * len(batches)
        with tqdm(
            total=total,
            desc="channel removal scores",
            unit="channel",
            disable=not progress,
            leave=False,
        ) as bar:
            totals = _summed_scores(
                method,
                model,
                batches,
                modules,
                shapes,
                found,
                prefixes,
                loss_fn,
                device,
                chunk_size,
                bar,
            )
    # One transfer at the end; clone() outside inference mode gives ordinary tensors.
    return {name: (totals[name] / len(batches)).to("cpu", dtype).clone() for name in modules}


def _summed_scores(
    method: Method,
    model: nn.Module,
    batches: Sequence[Batch],
    modules: Mapping[str, nn.Module],
    shapes: Mapping[str, tuple[int, ...]],
    layouts: Mapping[str, Layout],
    prefixes: Mapping[str, int],
    loss_fn: LossFn | None,
    device: torch.device,
    chunk_size: int | None,
    progress: Any,
) -> dict[str, Tensor]:
    """Sum over ``batches`` of the ``(C,)`` loss increases, per layer, by ``method``; the first
    ``prefixes[name]`` tokens of a ``(B, N, C)`` layer are not zeroed."""
    totals: dict[str, Tensor] = {}
    axes = {name: channel_axis(layout) for name, layout in layouts.items()}
    if method == "taylor":  # needs autograd: outside inference mode
        channels = sum(shapes[name][axes[name]] for name in modules)
        for x, y in batches:
            deltas = taylor_batch(
                model, x.to(device), y.to(device), modules, axes, prefixes, loss_fn
            )
            _add_into(totals, deltas)
            progress.update(channels)
        return totals
    with torch.inference_mode():
        if method == "exact":
            return exact_scores(
                model,
                batches,
                modules,
                shapes,
                layouts,
                loss_fn,
                device,
                chunk_size,
                progress,
                prefixes,
            )
        for x, y in batches:
            deltas = _reference_batch(
                model,
                x.to(device),
                y.to(device),
                modules,
                shapes,
                axes,
                prefixes,
                loss_fn,
                progress,
            )
            _add_into(totals, deltas)
    return totals


def _add_into(totals: dict[str, Tensor], deltas: Mapping[str, Tensor]) -> None:
    for name, delta in deltas.items():
        totals[name] = totals[name] + delta if name in totals else delta


def _probe_shapes(
    model: nn.Module, x: Tensor, modules: Mapping[str, nn.Module]
) -> dict[str, list[tuple[int, ...]]]:
    """Output shapes of every layer, call by call, checking that they are 3-D or 4-D maps."""
    seen = output_shapes(model, x, modules)
    calls: dict[str, list[tuple[int, ...]]] = {}
    for name in modules:
        outputs = seen.get(name)
        if not outputs:
            raise ValueError(
                f"Layer {name!r} was not called in the model's forward pass; choose a module "
                "that runs on every input."
            )
        calls[name] = [_as_map(name, shape, x.shape[0]) for shape in outputs]
    return calls


def _channels(name: str, calls: Sequence[tuple[int, ...]], layout: Layout) -> int:
    """The channel count of a layer's output, the same in every call, or a ``ValueError``."""
    counts = [layout_of(name, shape, layout) and shape[channel_axis(layout)] for shape in calls]
    if len(set(counts)) > 1:
        raise ValueError(
            f"Layer {name!r} is called {len(calls)} times with different channel counts "
            f"{counts}; choose a module that is called once."
        )
    return counts[0]


def _as_map(name: str, shape: tuple[int, ...] | type, batch: int) -> tuple[int, ...]:
    """``shape`` if it is a 3-D or 4-D map of ``batch`` samples, else a ``ValueError``."""
    if not (isinstance(shape, tuple) and len(shape) in (3, 4) and shape[0] == batch):
        got = shape if isinstance(shape, tuple) else shape.__name__
        raise ValueError(
            f"Layer {name!r} must output a (B, C, H, W), (B, H, W, C) or (B, N, C) tensor with "
            f"B = {batch}, got {got}; choose a convolutional or transformer layer or block."
        )
    return shape


# ------------------------------------------------------------------------------------------------
# method="reference": one full forward per channel per batch
# ------------------------------------------------------------------------------------------------
def _zero_channel_hook(
    channel: int, axis: int, prefix: int
) -> Callable[[nn.Module, Any, Any], Any]:
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        zeroed = cast(Tensor, output_map(output)).clone()  # a tuple's first element is the map
        kept = zeroed[:, prefix:] if prefix else zeroed  # (B, N - P, C): the prefix stays
        kept.select(axis, channel).zero_()  # channel j at every position or token
        return replace_map(output, zeroed)

    return hook


def _reference_batch(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    modules: Mapping[str, nn.Module],
    shapes: Mapping[str, tuple[int, ...]],
    axes: Mapping[str, int],
    prefixes: Mapping[str, int],
    loss_fn: LossFn | None,
    progress: Any,
) -> dict[str, Tensor]:
    base = batch_loss(_logits(model(x)), y, loss_fn)
    deltas = {}
    for name, module in modules.items():
        losses = []
        for j in range(shapes[name][axes[name]]):
            hook = _zero_channel_hook(j, axes[name], prefixes[name])
            handle = module.register_forward_hook(hook)
            try:
                losses.append(batch_loss(_logits(model(x)), y, loss_fn))
            finally:
                handle.remove()
            progress.update(1)
        deltas[name] = torch.stack(losses) - base
    return deltas


def attention_from_scores(
    scores: Mapping[str, Tensor], temperature: float = 5.0
) -> dict[str, Tensor]:
    r"""Channel weights from removal scores: a softmax of z-scores, per layer.

    For each layer, with ``delta`` the ``(C,)`` scores::

        z = (delta - mean(delta)) / std(delta)       # population std: sqrt(mean((delta - mean)^2))
        w = softmax(z / temperature)                 # w >= 0, sum(w) = 1

    A layer whose scores are all equal gets uniform weights ``1 / C``.

    Args:
        scores: ``{layer: delta (C,)}``, e.g. from :func:`channel_removal_scores`.
        temperature: ``T > 0``; larger is flatter (``inf`` gives uniform weights).

    Returns:
        ``{layer: w (C,)}`` in the order of ``scores``, same dtype and device.

    Raises:
        ValueError: ``temperature <= 0``, or scores that are not finite, non-empty and 1-D.

    Example:
        >>> import torch
        >>> w = attention_from_scores({"conv": torch.tensor([0.0, 1.0, 2.0])})["conv"]
        >>> round(float(w.sum()), 6)
        1.0
    """
    check_temperature(temperature)
    weights = {}
    for name, delta in scores.items():
        if delta.dim() != 1 or delta.numel() == 0:
            raise ValueError(
                f"Scores of layer {name!r} must be a non-empty (C,) tensor, got shape "
                f"{tuple(delta.shape)}."
            )
        if not delta.is_floating_point():
            delta = delta.to(torch.get_default_dtype())
        if not bool(torch.isfinite(delta).all()):
            raise ValueError(
                f"Scores of layer {name!r} contain NaN or infinite values; check that the head "
                "training converged (lower the learning rate) and the data are finite."
            )
        std = delta.std(correction=0)
        if bool((delta == delta[0]).all()) or float(std) == 0.0:
            weights[name] = torch.full_like(delta, 1.0 / delta.numel())
            continue
        z = (delta - delta.mean()) / std  # (C,)
        weights[name] = torch.softmax(z / temperature, dim=0)
    return weights
