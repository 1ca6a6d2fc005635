"""Which feature maps DELTA regularizes, their layouts, and checks on user-chosen layer names.

The reference code regularizes the output of the last block of each resolution stage. This module
reproduces its tables for ResNet and Inception-V3 and applies the same rule to any other CNN by a
dry forward pass.

A feature map has one of three layouts (:data:`Layout`): ``"BCHW"`` (convolutional maps),
``"BHWC"`` (channels last, e.g. Swin's stage outputs) and ``"BNC"`` (token sequences of vision
transformers). :func:`detect_layouts` finds a layer's layout from dry forward passes at two input
sizes: the axes that scale with the image are positions, the one that stays is the channel axis.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from deltaft._utils import dtype_device, eval_mode, get_submodule
from deltaft.layouts import (
    HOW_TO_DECLARE,
    LAYOUTS,
    Layout,
    channel_axis,
    declared_layout,
    layout_from_two_sizes,
    layout_of,
)

__all__ = [
    "LAYOUTS",
    "LayerInfo",
    "Layout",
    "channel_axis",
    "default_layers",
    "describe_layers",
    "detect_layouts",
    "layout_of",
    "output_shapes",
    "resolve_layers",
    "validate_layers",
]

INCEPTION_V3_LAYERS = ["Conv2d_2b_3x3", "Conv2d_4a_3x3", "Mixed_5d", "Mixed_6e"]
MIN_REDUCTION = 4  # stages at stride 2 (the stem) are not regularized, as in the reference


@dataclass(frozen=True)
class LayerInfo:
    """One module seen in a dry forward pass.

    Attributes:
        name: dotted module name.
        kind: the module's class name.
        shape: output shape for a batch of one, or ``None`` when the output is not a tensor.
        order: position in the order in which forward calls finished.
        calls: how many times the module ran in that forward (0 if it did not run).
    """

    name: str
    kind: str
    shape: tuple[int, ...] | None
    order: int
    calls: int = 1


def _dry_run_input(model: nn.Module, input_size: int) -> Tensor:
    dtype, device = dtype_device(model)
    return torch.zeros(1, 3, input_size, input_size, device=device, dtype=dtype)


def _second_input(example: Tensor) -> Tensor:
    """A zero input like ``example`` with its spatial sides doubled."""
    return example.new_zeros((*example.shape[:-2], 2 * example.shape[-2], 2 * example.shape[-1]))


def detect_layouts(
    model: nn.Module, layers: Sequence[str], *, input_size: int | Tensor = 224
) -> dict[str, Layout]:
    """The layout of each layer's output, from eval-mode dry forwards at two input sizes.

    The first pass takes a ``(1, 3, S, S)`` zero image (or ``input_size`` itself when it is an
    example input tensor), the second the same with sides ``2S``. Axes whose size changes are
    positions (``H, W`` or the tokens ``N``); the one axis that stays is the channel axis:

    * 4-D, axis 1 stays: ``"BCHW"``; axis 3 stays: ``"BHWC"`` (e.g. Swin's stage outputs).
    * 3-D, axis 2 stays and axis 1 (the tokens) changes: ``"BNC"``.

    When the model cannot take the second size (a fixed-size ViT), the model's declaration
    decides: timm's ``output_fmt`` (``NHWC`` / ``NCHW``) for 4-D maps, and ``"BNC"`` for a 3-D map
    whose last axis is the model's width (``embed_dim``, ``hidden_dim``, ``num_features`` or
    ``config.hidden_size``). Modes are restored afterwards.

    Raises:
        ValueError: a name is not a module, a layer does not run, or its layout cannot be
            decided (e.g. a ``(B, C, 1, 1)`` pooled output, per-head attention tensors, or a
            fixed-size model that declares nothing); the message says how to declare it.

    Example:
        >>> import torchvision
        >>> detect_layouts(torchvision.models.swin_t(), ["features.1"], input_size=64)
        {'features.1': 'BHWC'}
    """
    layers = [layers] if isinstance(layers, str) else list(layers)
    modules = resolve_layers(model, layers)
    x = input_size if isinstance(input_size, Tensor) else _dry_run_input(model, input_size)
    with eval_mode(model), torch.no_grad():
        first = output_shapes(model, x[:1], modules)
        try:
            second: dict[str, list[tuple[int, ...] | type]] | None = output_shapes(
                model, _second_input(x[:1]), modules
            )
        except Exception:  # a fixed-size model raises many types; its declaration decides below
            second = None
    sides = f"{x.shape[-2]}x{x.shape[-1]}"
    layouts: dict[str, Layout] = {}
    for name in layers:
        shape = first[name][0] if first.get(name) else None
        if not isinstance(shape, tuple):
            got = "does not run in forward()" if shape is None else f"returns {shape.__name__}"
            raise ValueError(
                f"Layer {name!r} of {type(model).__name__} {got}; choose a module whose output "
                "is a feature map."
            )
        if len(shape) not in (3, 4):
            raise ValueError(
                f"Layer {name!r} of {type(model).__name__} gave shape {shape}, which has no "
                "channel and position axes."
            )
        other = second[name][0] if second is not None and second.get(name) else None
        layout = layout_from_two_sizes(shape, other if isinstance(other, tuple) else None)
        if layout is None and second is None:
            layout = declared_layout(model, shape)
        if layout is None:
            seen = (
                f"{shape} at {sides} and {other} at twice that size"
                if second is not None
                else f"{shape} at {sides}, and the model does not take another input size"
            )
            raise ValueError(
                f"Cannot tell which axis of layer {name!r} holds the channels: its output is "
                f"{seen}; choose a layer whose map is (B, C, H, W), (B, H, W, C) or (B, N, C), "
                f"or {HOW_TO_DECLARE.format(name=name)}."
            )
        layouts[name] = layout
    return layouts


def resolve_layers(model: nn.Module, layers: Sequence[str]) -> dict[str, nn.Module]:
    """``{name: module}`` for distinct module names of ``model``, in the order given.

    Raises:
        ValueError: ``layers`` is a string or empty, repeats a name, or names a module that
            ``model`` does not have (the message lists close matches).

    Example:
        >>> import torchvision
        >>> list(resolve_layers(torchvision.models.resnet18(), ["layer1", "layer4.1.conv2"]))
        ['layer1', 'layer4.1.conv2']
    """
    if isinstance(layers, str) or not layers:
        raise ValueError(
            f"layers must be a non-empty list of module names, got {layers!r}; "
            "e.g. ['layer1.2.conv3', 'layer2.3.conv3']."
        )
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct, got {list(layers)}.")
    return {name: get_submodule(model, name) for name in layers}


def output_shapes(
    model: nn.Module, x: Tensor, modules: Mapping[str, nn.Module]
) -> dict[str, list[tuple[int, ...] | type]]:
    """Run ``model(x)`` once and record what each of ``modules`` returns, call by call.

    The caller chooses the mode and the grad context. Forward hooks are removed afterwards.

    Returns:
        ``{name: [output shape, or the output's type when it is not a tensor, per call]}`` for
        the modules that ran, in the order in which their first call finished.
    """
    seen: dict[str, list[tuple[int, ...] | type]] = {}

    def recorder(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output)
            seen.setdefault(name, []).append(shape)

        return hook

    handles = [module.register_forward_hook(recorder(name)) for name, module in modules.items()]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def describe_layers(model: nn.Module, *, input_size: int = 224) -> list[LayerInfo]:
    """Run one eval-mode forward of a ``(1, 3, S, S)`` zero image and record every module's output.

    Returns ``LayerInfo`` in ``named_modules()`` order (the root module excluded); a module called
    more than once is described by its first call. Every module's train/eval mode is restored
    afterwards.

    Example:
        >>> import torchvision
        >>> info = describe_layers(torchvision.models.resnet18(), input_size=64)[0]
        >>> info.name, info.kind, info.shape
        ('conv1', 'Conv2d', (1, 64, 32, 32))
    """
    named = {name: module for name, module in model.named_modules() if name}
    with eval_mode(model), torch.no_grad():
        seen = output_shapes(model, _dry_run_input(model, input_size), named)
    order = {name: position for position, name in enumerate(seen)}
    infos = []
    for name, module in named.items():
        first = seen[name][0] if name in seen else None
        shape = first if isinstance(first, tuple) else None
        calls = len(seen.get(name, ()))
        infos.append(LayerInfo(name, type(module).__name__, shape, order.get(name, -1), calls))
    return infos


def _resnet_layers(model: nn.Module) -> list[str] | None:
    """``layerN.<last>.conv3`` (bottleneck) or ``.conv2`` (basic block), as the reference does."""
    names = []
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        blocks = getattr(model, stage, None)
        if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
            return None
        last = len(blocks) - 1
        block = blocks[last]
        conv = "conv3" if hasattr(block, "conv3") else "conv2" if hasattr(block, "conv2") else None
        if conv is None:
            return None
        names.append(f"{stage}.{last}.{conv}")
    return names


def _evenly_spaced(prefix: str, count: int, depths: int = 4) -> list[str]:
    """``depths`` block names spread over ``count`` blocks, the last included (12: 2 5 8 11)."""
    picks = sorted({round((i + 1) * count / depths) - 1 for i in range(min(depths, count))})
    return [f"{prefix}{i}" for i in picks]


def _transformer_layers(model: nn.Module) -> list[str] | None:
    """The residual stream of a vision transformer at 4 depths, or Swin's stage ends.

    * timm ViT / DeiT / EVA / DINOv2 (``patch_embed`` and ``blocks``): ``blocks.N``.
    * torchvision ``vit_*``: ``encoder.layers.encoder_layer_N``.
    * torchvision ``swin_*``: the stage ``Sequential`` s of ``features`` (``features.1 .3 .5 .7``).
    """
    blocks = getattr(model, "blocks", None)
    kinds = (nn.Sequential, nn.ModuleList)
    flat = isinstance(blocks, kinds) and len(blocks) and not isinstance(blocks[0], kinds)
    if hasattr(model, "patch_embed") and flat:  # a flat list of blocks, not of stages
        return _evenly_spaced("blocks.", len(cast(nn.Module, blocks)._modules))
    encoder = getattr(model, "encoder", None)
    layers = getattr(encoder, "layers", None)
    if hasattr(model, "conv_proj") and isinstance(layers, nn.Sequential) and len(layers):
        names = [name for name, _ in layers.named_children()]
        prefix = names[0].rstrip("0123456789")
        if names == [f"{prefix}{i}" for i in range(len(names))]:
            return _evenly_spaced(f"encoder.layers.{prefix}", len(names))
    features = getattr(model, "features", None)
    if type(model).__name__.startswith("SwinTransformer") and isinstance(features, nn.Sequential):
        stages = [f"features.{n}" for n, m in features.named_children() if type(m) is nn.Sequential]
        return stages[1:] if len(stages) > 1 else None  # features.0 is the patch embedding
    return None


def _timm_layers(model: nn.Module) -> list[str] | None:
    info = getattr(model, "feature_info", None)
    if not isinstance(info, list) or not info or not isinstance(info[0], dict):
        return None
    modules = dict(model.named_modules())
    names = [
        str(f["module"])
        for f in info
        if f.get("reduction", 0) >= MIN_REDUCTION and f.get("module") in modules
    ]
    return names or None


def _stage_layers(model: nn.Module, input_size: int) -> list[str]:
    """The generic rule: last block of each resolution stage of the network's trunk.

    The trunk is the module whose direct children cover the most output resolutions; its
    "blocks" are the children of its most common type (``InvertedResidual`` in MobileNetV2,
    stage ``Sequential`` s in EfficientNet/ConvNeXt). For every resolution with stride >= 4, the
    last such block that outputs it is chosen.
    """
    infos = describe_layers(model, input_size=input_size)
    by_name = {i.name: i for i in infos}
    children: dict[str, list[LayerInfo]] = {}
    for info in infos:
        parent = info.name.rpartition(".")[0]
        children.setdefault(parent, []).append(info)

    def resolutions(items: list[LayerInfo]) -> set[int]:
        return {i.shape[2] for i in items if i.shape is not None and len(i.shape) == 4}

    # max() keeps the first of equal counts, and dict order is parents-first: the shallowest wins.
    trunk = max(children, key=lambda p: len(resolutions(children[p])))
    blocks = [i for i in children[trunk] if i.shape is not None and len(i.shape) == 4]
    if not blocks:
        raise ValueError(
            f"No module of {type(model).__name__} outputs a (B, C, H, W) feature map for a "
            f"{input_size}x{input_size} input; pass the layer names explicitly."
        )
    kind = Counter(i.kind for i in blocks).most_common(1)[0][0]
    blocks = sorted((i for i in blocks if i.kind == kind), key=lambda i: i.order)
    last_at: dict[int, str] = {}
    for info in blocks:
        assert info.shape is not None
        last_at[info.shape[2]] = info.name
    chosen = [name for size, name in last_at.items() if input_size / size >= MIN_REDUCTION - 0.5]
    chosen = chosen or list(last_at.values())
    return sorted(chosen, key=lambda n: by_name[n].order)


def default_layers(model: nn.Module, *, input_size: int = 224) -> list[str]:
    """The layers DELTA regularizes by default, shallow to deep.

    * ResNet (torchvision or timm): ``layerN.<last block>.conv3`` for bottleneck blocks
      (ResNet-50/101/152), ``.conv2`` for basic blocks (ResNet-18/34), as in the reference code.
    * Inception-V3: ``Conv2d_2b_3x3 Conv2d_4a_3x3 Mixed_5d Mixed_6e`` (reference table).
    * Vision transformers: the residual stream (``(B, N, C)`` tokens) after 4 evenly spaced
      blocks, the last included: timm ViT/DeiT/EVA/DINOv2 ``blocks.N`` (ViT-B: 2 5 8 11),
      torchvision ``vit_*`` ``encoder.layers.encoder_layer_N``; torchvision ``swin_*``: the end
      of each stage, ``features.1 .3 .5 .7`` (``(B, H, W, C)`` maps; timm Swin through its
      ``feature_info``).
    * timm models with ``feature_info``: its modules at stride >= 4.
    * Any other CNN: the last block of each resolution stage at stride >= 4, from a dry forward
      pass of a ``input_size`` square image (MobileNetV2: ``features.3 .6 .13 .17``).

    Example:
        >>> import torchvision
        >>> default_layers(torchvision.models.resnet50())
        ['layer1.2.conv3', 'layer2.3.conv3', 'layer3.5.conv3', 'layer4.2.conv3']
    """
    if all(hasattr(model, n) for n in INCEPTION_V3_LAYERS):
        return list(INCEPTION_V3_LAYERS)
    for rule in (_resnet_layers, _transformer_layers, _timm_layers):
        names = rule(model)
        if names:
            return names
    return _stage_layers(model, input_size)


def _qualifying(model: nn.Module, input_size: int) -> list[str]:
    """Modules whose output has a channel axis that two dry forwards decide (hint for errors)."""
    first = describe_layers(model, input_size=input_size)
    try:
        second = {i.name: i.shape for i in describe_layers(model, input_size=2 * input_size)}
    except Exception:  # a fixed-size model: the declaration decides, as in detect_layouts
        return [i.name for i in first if i.shape and declared_layout(model, i.shape)]
    return [i.name for i in first if i.shape and layout_from_two_sizes(i.shape, second[i.name])]


def validate_layers(
    model: nn.Module,
    layers: Sequence[str],
    *,
    input_size: int = 224,
    layouts: Mapping[str, Layout] | None = None,
) -> dict[str, tuple[int, ...]]:
    """Check that every name is a module of ``model`` whose output has a known channel axis.

    The layouts are ``layouts`` where given (checked against each output's rank), else found by
    :func:`detect_layouts`.

    Returns:
        ``{name: output shape for a batch of one}``, in the order given.

    Args:
        model: the network.
        layers: dotted module names, or a single name.
        input_size: side of the square zero image of the dry forward pass.
        layouts: declared layouts by layer name; ``None`` to detect them.

    Raises:
        ValueError: empty or repeated names, an unknown name (close matches listed), a module that
            does not run in ``forward``, runs more than once per forward (a shared activation:
            which call's map is meant cannot be told), or whose output's layout cannot be decided
            or is not the declared one (the message lists layers that qualify).
    """
    layers = [layers] if isinstance(layers, str) else list(layers)
    resolve_layers(model, layers)
    infos = {i.name: i for i in describe_layers(model, input_size=input_size)}
    shapes: dict[str, tuple[int, ...]] = {}
    for name in layers:
        shape = infos[name].shape
        try:
            if shape is None:
                raise ValueError(f"Layer {name!r} of {type(model).__name__} gave no tensor.")
            if layouts is None:
                detect_layouts(model, [name], input_size=input_size)
            else:
                layout_of(name, shape, layouts)
        except ValueError as error:
            some = ", ".join(_qualifying(model, input_size)[-8:]) or "none"
            raise ValueError(
                f"{error} DELTA needs a module with a (B, C, H, W), (B, H, W, C) or (B, N, C) "
                f"output. Some that qualify: {some}."
            ) from None
        if infos[name].calls > 1:
            raise ValueError(
                f"Layer {name!r} of {type(model).__name__} runs {infos[name].calls} times per "
                "forward, so its map is ambiguous (a shared activation such as a ResNet block's "
                "relu); choose a module that is called once, such as a convolution or a block."
            )
        shapes[name] = shape
    return shapes
