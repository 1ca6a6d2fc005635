"""Find and replace the classifier head of a pretrained network.

DELTA splits a network into the pre-trained backbone (regularized toward the source) and a **new**
head for the target classes (regularized by ``beta/2 * ||head||^2``). These helpers locate the head
by dotted module name and swap it for a freshly initialised layer of the same kind: an
``nn.Linear`` (ResNet ``fc``, MobileNetV2 ``classifier.1``, ViT ``head``), or a 1x1 ``nn.Conv2d``
classifier whose map is pooled afterwards (SqueezeNet ``classifier.1``).
"""

from __future__ import annotations

from typing import cast

from torch import nn

from deltaft._utils import dtype_device, get_submodule, set_submodule

__all__ = [
    "HeadError",
    "check_head",
    "find_head",
    "head_parameter_names",
    "is_head_kind",
    "replace_head",
]


class HeadError(ValueError):
    """The classifier head cannot be found or is not a layer :func:`replace_head` can rebuild.

    Attributes:
        problem: what is wrong, without the advice (callers that name settings differently,
            such as the command line's ``--head``, add their own).
    """

    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__(f"{problem}; name the classifier module with head='NAME'.")


def is_head_kind(module: nn.Module) -> bool:
    """Whether ``module`` is a classifier :func:`replace_head` can rebuild: an ``nn.Linear``, or
    a 1x1 ``nn.Conv2d`` with stride 1, no padding and one group (a per-position linear map)."""
    if isinstance(module, nn.Linear):
        return True
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and module.padding in ((0, 0), "valid")
        and module.groups == 1
    )


def _conv_head(model: nn.Module) -> str | None:
    """The last module with parameters of its own, when it is a 1x1 conv classifier."""
    owners = [(n, m) for n, m in model.named_modules() if any(True for _ in m.parameters(False))]
    if owners and isinstance(owners[-1][1], nn.Conv2d) and is_head_kind(owners[-1][1]):
        return owners[-1][0]
    return None


def find_head(model: nn.Module, head: str | None = None) -> str:
    """Return the dotted name of ``model``'s classifier head.

    Args:
        model: a classifier (torchvision, timm, or any ``nn.Module``).
        head: the head's name, when the caller knows it; it is validated and returned.

    Returns:
        The name given, else timm's ``pretrained_cfg["classifier"]`` when that module is an
        ``nn.Linear`` or a 1x1 conv, else the name of the last ``nn.Linear`` registered in the
        model (``fc`` for ResNet and Inception-V3, ``classifier.1`` for MobileNetV2), else, in a
        model without any ``nn.Linear``, the last module with parameters when it is a 1x1
        ``nn.Conv2d`` (``classifier.1`` for SqueezeNet).

    Raises:
        ValueError: the named module does not exist.
        HeadError: no head can be found.
    """
    if head is not None:
        get_submodule(model, head)
        return head
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and isinstance(cfg.get("classifier"), str):
        name = cfg["classifier"]
        module = dict(model.named_modules()).get(name)
        if module is not None and is_head_kind(module):
            return name
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    conv = _conv_head(model)
    if conv is None:
        raise HeadError(
            f"No nn.Linear classifier head found in {type(model).__name__}, and its last layer "
            "with parameters is not a 1x1 nn.Conv2d classifier"
        )
    return conv


def check_head(model: nn.Module, name: str) -> nn.Module:
    """``model``'s module ``name``, checked to be a classifier :func:`replace_head` can rebuild.

    Raises:
        ValueError: no module ``name``.
        HeadError: the module is of another kind (:func:`is_head_kind`).
    """
    module = get_submodule(model, name)
    if not is_head_kind(module):
        raise HeadError(
            f"Head {name!r} is a {type(module).__name__}, expected nn.Linear or a 1x1 nn.Conv2d "
            "(stride 1, no padding, one group) that outputs the class scores"
        )
    return module


def replace_head(model: nn.Module, num_classes: int, head: str | None = None) -> str:
    """Replace the classifier head with a new layer of the same kind, in place.

    An ``nn.Linear`` becomes ``nn.Linear(in_features, num_classes)``; a 1x1 ``nn.Conv2d``
    becomes ``nn.Conv2d(in_channels, num_classes, 1)``; the bias is kept when the old layer has
    one. The new layer uses PyTorch's default initialisation and lives on the old head's device
    and dtype. Returns the head's dotted name.

    Raises:
        ValueError: ``num_classes < 1``, or a named module that does not exist.
        HeadError: no head found, or the head is another kind of module (:func:`is_head_kind`).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    name = find_head(model, head)
    old = check_head(model, name)
    new: nn.Module
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:  # a 1x1 nn.Conv2d (check_head)
        conv = cast(nn.Conv2d, old)
        new = nn.Conv2d(conv.in_channels, num_classes, 1, bias=conv.bias is not None)
    dtype, device = dtype_device(old)
    new.to(device=device, dtype=dtype)
    set_submodule(model, name, new)
    return name


def head_parameter_names(model: nn.Module, head: str) -> list[str]:
    """Names (as in ``model.named_parameters()``) of the parameters that belong to ``head``."""
    get_submodule(model, head)
    prefix = head + "."
    return [n for n, _ in model.named_parameters() if n.startswith(prefix)]
