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
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from deltaft._family_layers import hf_layers, transformer_layers
from deltaft._probe import LayerInfo, describe_layers, dry_run_input, output_shapes
from deltaft._utils import eval_mode, get_submodule
from deltaft.layouts import (
    HOW_TO_DECLARE,
    LAYOUTS,
    Layout,
    channel_axis,
    check_declared,
    declared_layout,
    layout_from_two_sizes,
    layout_of,
)

__all__ = [
    "LAYOUTS",
    "LayerInfo",
    "Layout",
    "channel_axis",
    "check_layers",
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


def _second_input(example: Tensor) -> Tensor:
    """A zero input like ``example`` with its spatial sides doubled."""
    return example.new_zeros((*example.shape[:-2], 2 * example.shape[-2], 2 * example.shape[-1]))


def detect_layouts(
    model: nn.Module,
    layers: Sequence[str],
    *,
    input_size: int | Tensor = 224,
    layouts: Mapping[str, Layout] | Layout | None = None,
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

    ``layouts`` declares the layouts instead (one for every layer, or a mapping by layer name;
    the layers a mapping leaves out are detected): a declaration is checked against the same
    two passes, its rank and that its channel axis keeps its size
    (:func:`~deltaft.layouts.check_declared`), and wins where the shapes cannot decide.

    Raises:
        ValueError: a name is not a module, a layer does not run, or its layout cannot be
            decided (e.g. a ``(B, C, 1, 1)`` pooled output, per-head attention tensors, or a
            fixed-size model that declares nothing); the message says how to declare it. A
            declared layout of another rank, or whose channel axis scales with the input.

    Example:
        >>> import torchvision
        >>> detect_layouts(torchvision.models.swin_t(), ["features.1"], input_size=64)
        {'features.1': 'BHWC'}
    """
    layers = [layers] if isinstance(layers, str) else list(layers)
    modules = resolve_layers(model, layers)
    x = input_size if isinstance(input_size, Tensor) else dry_run_input(model, input_size)
    with eval_mode(model), torch.no_grad():
        first = output_shapes(model, x[:1], modules)
        try:
            second: dict[str, list[tuple[int, ...] | type]] | None = output_shapes(
                model, _second_input(x[:1]), modules
            )
        except Exception:  # a fixed-size model raises many types; its declaration decides below
            second = None
    sides = f"{x.shape[-2]}x{x.shape[-1]}"
    found: dict[str, Layout] = {}
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
        at_double = second[name][0] if second is not None and second.get(name) else None
        other = at_double if isinstance(at_double, tuple) else None
        if isinstance(layouts, str) or (layouts is not None and name in layouts):
            declared = layout_of(name, shape, layouts)  # checks the rank
            check_declared(name, declared, shape, other)
            found[name] = declared
            continue
        layout = layout_from_two_sizes(shape, other)
        if layout is None and second is None:
            layout = declared_layout(model, shape)
        if layout is None:
            seen = (
                f"{shape} at {sides} and {at_double} at twice that size"
                if second is not None
                else f"{shape} at {sides}, and the model does not take another input size"
            )
            raise ValueError(
                f"Cannot tell which axis of layer {name!r} holds the channels: its output is "
                f"{seen}; choose a layer whose map is (B, C, H, W), (B, H, W, C) or (B, N, C), "
                f"or {HOW_TO_DECLARE.format(name=name)}."
            )
        found[name] = layout
    return found


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
    * Hugging Face models: ViT-style ``<prefix>.encoder.layer.N`` / ``<prefix>.layers.N`` at 4
      depths (tokens), Swin's last block of each stage ``<prefix>.encoder.layers.N.blocks.M``
      (tokens, before the patch merging), conv models' stage ends ``<prefix>.encoder.stages.N``.
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
    for rule in (_resnet_layers, transformer_layers, hf_layers, _timm_layers):
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
    layouts: Mapping[str, Layout] | Layout | None = None,
) -> dict[str, tuple[int, ...]]:
    """Check that every name is a module of ``model`` whose output has a known channel axis.

    The checks of :func:`check_layers`; this returns the shapes, that the layouts.

    Returns:
        ``{name: output shape for a batch of one}``, in the order given.
    """
    layers = [layers] if isinstance(layers, str) else list(layers)
    shapes, _ = _checked(model, layers, input_size, layouts)
    return shapes


def check_layers(
    model: nn.Module,
    layers: Sequence[str],
    *,
    input_size: int = 224,
    layouts: Mapping[str, Layout] | Layout | None = None,
) -> dict[str, Layout]:
    """Check the layers as :func:`validate_layers` does and return their layouts, decided once.

    The layouts are ``layouts`` where declared (one for all layers or by name, checked against
    the dry forwards by :func:`detect_layouts`), else detected; pass the result to
    :class:`~deltaft.objective.TransferObjective` and the attention estimation so that both read
    the maps on the same axis without detecting again.

    Args:
        model: the network.
        layers: dotted module names, or a single name.
        input_size: side of the square zero image of the dry forward pass.
        layouts: declared layouts; ``None`` to detect them.

    Returns:
        ``{name: layout}``, in the order given.

    Raises:
        ValueError: empty or repeated names, an unknown name (close matches listed), a module that
            does not run in ``forward``, runs more than once per forward (a shared activation:
            which call's map is meant cannot be told), or whose output's layout cannot be decided
            or contradicts the declared one (the message lists layers that qualify).
    """
    layers = [layers] if isinstance(layers, str) else list(layers)
    _, found = _checked(model, layers, input_size, layouts)
    return found


def _checked(
    model: nn.Module,
    layers: list[str],
    input_size: int,
    layouts: Mapping[str, Layout] | Layout | None,
) -> tuple[dict[str, tuple[int, ...]], dict[str, Layout]]:
    """The shapes and layouts of :func:`check_layers`: one describe pass, one detection."""
    resolve_layers(model, layers)
    infos = {i.name: i for i in describe_layers(model, input_size=input_size)}
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        for name in layers:
            shape = infos[name].shape
            if shape is None:
                raise ValueError(f"Layer {name!r} of {type(model).__name__} gave no tensor.")
            shapes[name] = shape
        found = detect_layouts(model, layers, input_size=input_size, layouts=layouts)
    except ValueError as error:
        if layouts is not None:  # a declaration the maps contradict: the message says the fix
            raise
        some = ", ".join(_qualifying(model, input_size)[-8:]) or "none"
        raise ValueError(
            f"{error} DELTA needs a module with a (B, C, H, W), (B, H, W, C) or (B, N, C) "
            f"output. Some that qualify: {some}."
        ) from None
    for name in layers:
        if infos[name].calls > 1:
            raise ValueError(
                f"Layer {name!r} of {type(model).__name__} runs {infos[name].calls} times per "
                "forward, so its map is ambiguous (a shared activation such as a ResNet block's "
                "relu); choose a module that is called once, such as a convolution or a block."
            )
    return shapes, found
