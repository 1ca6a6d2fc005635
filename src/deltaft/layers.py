"""Which feature maps DELTA regularizes, and checks on user-chosen layer names.

The reference code regularizes the output of the last block of each resolution stage. This module
reproduces its tables for ResNet and Inception-V3 and applies the same rule to any other CNN by a
dry forward pass.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from deltaft._utils import get_submodule

__all__ = ["LayerInfo", "default_layers", "describe_layers", "validate_layers"]

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
    """

    name: str
    kind: str
    shape: tuple[int, ...] | None
    order: int


def _dry_run_input(model: nn.Module, input_size: int) -> Tensor:
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.zeros(1, 3, input_size, input_size, device=device, dtype=dtype)


def describe_layers(model: nn.Module, *, input_size: int = 224) -> list[LayerInfo]:
    """Run one eval-mode forward of a ``(1, 3, S, S)`` zero image and record every module's output.

    Returns ``LayerInfo`` in ``named_modules()`` order (the root module excluded). The model's
    train/eval mode is restored afterwards.
    """
    infos: dict[str, tuple[tuple[int, ...] | None, int]] = {}
    handles = []

    def make_hook(name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            shape = tuple(output.shape) if isinstance(output, Tensor) else None
            if name not in infos:  # a module called twice keeps its first output
                infos[name] = (shape, len(infos))

        return hook

    named = [(n, m) for n, m in model.named_modules() if n]
    for name, module in named:
        handles.append(module.register_forward_hook(make_hook(name)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(_dry_run_input(model, input_size))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return [
        LayerInfo(name, type(module).__name__, *infos.get(name, (None, -1)))
        for name, module in named
    ]


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
    for rule in (_resnet_layers, _timm_layers):
        names = rule(model)
        if names:
            return names
    return _stage_layers(model, input_size)


def validate_layers(
    model: nn.Module, layers: Sequence[str], *, input_size: int = 224
) -> dict[str, tuple[int, ...]]:
    """Check that every name is a module of ``model`` with a ``(B, C, H, W)`` output.

    Returns:
        ``{name: output shape for a batch of one}``, in the order given.

    Raises:
        ValueError: empty or repeated names, an unknown name (close matches listed), a module that
            does not run in ``forward`` or whose output is not 4-D.
    """
    if isinstance(layers, str):
        layers = [layers]
    if not layers:
        raise ValueError("At least one layer name is needed.")
    if len(set(layers)) != len(layers):
        raise ValueError(f"Layer names must be unique, got {list(layers)}.")
    for name in layers:
        get_submodule(model, name)
    infos = {i.name: i for i in describe_layers(model, input_size=input_size)}
    shapes: dict[str, tuple[int, ...]] = {}
    for name in layers:
        shape = infos[name].shape
        if shape is None or len(shape) != 4:
            four_d = [n for n, i in infos.items() if i.shape is not None and len(i.shape) == 4]
            got = "no tensor" if shape is None else f"shape {shape}"
            raise ValueError(
                f"Layer {name!r} of {type(model).__name__} gave {got}; DELTA needs a module with "
                f"a (B, C, H, W) output. Some that qualify: {', '.join(four_d[-8:])}."
            )
        shapes[name] = shape
    return shapes
