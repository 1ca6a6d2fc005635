"""Dry forward passes that record what modules return (internal to :mod:`deltaft.layers`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from deltaft._utils import dtype_device, eval_mode

__all__ = [
    "LayerInfo",
    "describe_layers",
    "dry_run_input",
    "output_map",
    "output_shapes",
    "replace_map",
]


def output_map(output: Any) -> Tensor | None:
    """The feature map a module returns: the tensor itself, or the first element of a plain
    tuple or list that starts with a tensor (Hugging Face transformers 4 blocks return
    ``(hidden_states, ...)``); ``None`` for anything else, named tuples and output objects
    included (which of their fields is the map is not for us to guess)."""
    if isinstance(output, Tensor):
        return output
    if type(output) in (tuple, list) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


def replace_map(output: Any, new: Tensor) -> Any:
    """``output`` with its feature map (see :func:`output_map`) replaced by ``new``."""
    if isinstance(output, Tensor):
        return new
    return type(output)([new, *output[1:]])


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


def dry_run_input(model: nn.Module, input_size: int) -> Tensor:
    dtype, device = dtype_device(model)
    return torch.zeros(1, 3, input_size, input_size, device=device, dtype=dtype)


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
            found = output_map(output)
            shape = tuple(found.shape) if found is not None else type(output)
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
        seen = output_shapes(model, dry_run_input(model, input_size), named)
    order = {name: position for position, name in enumerate(seen)}
    infos = []
    for name, module in named.items():
        first = seen[name][0] if name in seen else None
        shape = first if isinstance(first, tuple) else None
        calls = len(seen.get(name, ()))
        infos.append(LayerInfo(name, type(module).__name__, shape, order.get(name, -1), calls))
    return infos
