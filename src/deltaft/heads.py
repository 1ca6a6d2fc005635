"""Find and replace the classifier head of a pretrained network.

DELTA splits a network into the pre-trained backbone (regularized toward the source) and a **new**
head for the target classes (regularized by ``beta/2 * ||head||^2``). These helpers locate the head
by dotted module name and swap it for a freshly initialised ``nn.Linear``.
"""

from __future__ import annotations

from torch import nn

from deltaft._utils import get_submodule, set_submodule

__all__ = ["find_head", "head_parameter_names", "replace_head"]


def find_head(model: nn.Module, head: str | None = None) -> str:
    """Return the dotted name of ``model``'s classifier head.

    Args:
        model: a classifier (torchvision, timm, or any ``nn.Module``).
        head: the head's name, when the caller knows it; it is validated and returned.

    Returns:
        The name given, else timm's ``pretrained_cfg["classifier"]`` when present, else the name of
        the last ``nn.Linear`` registered in the model (``fc`` for ResNet and Inception-V3,
        ``classifier.1`` for MobileNetV2).

    Raises:
        ValueError: the named module does not exist, or no ``nn.Linear`` head can be found.
    """
    if head is not None:
        get_submodule(model, head)
        return head
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and isinstance(cfg.get("classifier"), str):
        name = cfg["classifier"]
        if isinstance(dict(model.named_modules()).get(name), nn.Linear):
            return name
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"No nn.Linear classifier head found in {type(model).__name__}; "
            "name the head module explicitly (head='...')."
        )
    return linears[-1]


def replace_head(model: nn.Module, num_classes: int, head: str | None = None) -> str:
    """Replace the classifier head with a new ``nn.Linear(in_features, num_classes)``, in place.

    The new layer uses PyTorch's default initialisation and lives on the old head's device and
    dtype. Returns the head's dotted name.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    name = find_head(model, head)
    old = get_submodule(model, name)
    if not isinstance(old, nn.Linear):
        raise ValueError(
            f"Head {name!r} is a {type(old).__name__}, expected nn.Linear; "
            "name the final nn.Linear module as the head."
        )
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    set_submodule(model, name, new)
    return name


def head_parameter_names(model: nn.Module, head: str) -> list[str]:
    """Names (as in ``model.named_parameters()``) of the parameters that belong to ``head``."""
    get_submodule(model, head)
    prefix = head + "."
    return [n for n, _ in model.named_parameters() if n.startswith(prefix)]
