"""Refuse a backbone the run cannot use as given, before anything is trained: an input size the
model cannot take, a classifier head that cannot be found or rebuilt.

A vision transformer built for 224 px asserts on a 64 px image; Inception-V3 at 64 px or ConvNeXt
at 16 px shrink their map below a kernel; a toy network whose ``nn.Linear`` expects a fixed
flattened size fails on a matrix product. Each of these would end a run in a traceback from deep
inside the model. :func:`check_input_size` runs the one dry forward that finds out and turns the
failure into a :class:`~deltaft.app.errors.SettingError` naming ``image_size`` and, where the model
declares it or a forward confirms it, the size the model takes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from deltaft._utils import dtype_device, eval_mode
from deltaft.app.errors import SettingError, literal
from deltaft.heads import HeadError

__all__ = ["check_input_size", "declared_input_sizes", "head_as_setting"]

_CAUSE_CHARS = 160  # the model's own message, cut to keep the error on one readable line


def _square(value: object) -> int | None:
    """``224`` for ``224``, ``(224, 224)`` or ``(3, 224, 224)``; ``None`` otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, tuple | list) and len(value) >= 2:
        height, width = value[-2], value[-1]
        if isinstance(height, int) and height == width:
            return height
    return None


def declared_input_sizes(model: nn.Module) -> Iterator[tuple[int, str]]:
    """The input sides ``model`` declares, most specific first, each with where it was found.

    * ``model.image_size`` (torchvision ``vit_*``, which asserts on any other size);
    * ``model.patch_embed.img_size`` (timm ViT/DeiT/Swin built with a strict image size);
    * ``model.pretrained_cfg["input_size"]`` (every timm model: the size its weights were
      trained at).

    Non-square declarations are skipped (the data pipeline makes square images).
    """
    side = _square(getattr(model, "image_size", None))
    if side is not None:
        yield side, "its image_size"
    embed = getattr(model, "patch_embed", None)
    if embed is not None and getattr(embed, "strict_img_size", True):
        side = _square(getattr(embed, "img_size", None))
        if side is not None:
            yield side, "its patch embedding's img_size"
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, Mapping):
        side = _square(cfg.get("input_size"))
        if side is not None:
            yield side, 'its pretrained_cfg["input_size"]'


def _runs(model: nn.Module, side: int) -> BaseException | None:
    """``None`` when an eval-mode forward of a ``(1, 3, side, side)`` zero image works, else
    the exception it raised (train/eval modes are restored)."""
    dtype, device = dtype_device(model)
    x = torch.zeros(1, 3, side, side, dtype=dtype, device=device)
    try:
        with eval_mode(model), torch.no_grad():
            model(x)
    except Exception as exc:  # models fail on a wrong size with many types (assert, matmul, conv)
        return exc
    return None


def check_input_size(model: nn.Module, image_size: int, *, name: str, native: int) -> None:
    """Refuse an ``image_size`` that ``model`` cannot take, with the size it takes.

    Runs one eval-mode forward of a ``(1, 3, image_size, image_size)`` zero image without
    gradients (modes restored). When it fails, the sides the model declares
    (:func:`declared_input_sizes`) and then ``native`` (the size of its weights' preprocessing)
    are tried in that order, and the first that runs is named in the error.

    Args:
        model: the source network, on any device.
        image_size: the side the run will use.
        name: the model's name as the user gave it (for the message).
        native: the side of the weights' preprocessing (:attr:`ModelInfo.input_size`).

    Raises:
        SettingError: the forward failed; the message names ``image_size``, the model's own
            error cut to one line, and the size that runs when one was found.
    """
    error = _runs(model, image_size)
    if error is None:
        return
    cause = " ".join(str(error).split()) or type(error).__name__
    if len(cause) > _CAUSE_CHARS:
        cause = cause[: _CAUSE_CHARS - 3] + "..."
    cause = f"{type(error).__name__}: {cause}"
    tried = {image_size}
    candidates = [*declared_input_sizes(model), (native, "the size of its weights' transforms")]
    for side, where in candidates:
        if side in tried:
            continue
        tried.add(side)
        if _runs(model, side) is None:
            raise SettingError(
                f"{literal(name)} cannot take {image_size}x{image_size} images "
                f"({literal(cause)}); it takes {side}x{side} ({where}): pass {{image_size}} {side}."
            )
    raise SettingError(
        f"{literal(name)} cannot take {image_size}x{image_size} images ({literal(cause)}); pass "
        "{image_size} with the side the model was built for."
    )


@contextlib.contextmanager
def head_as_setting() -> Iterator[None]:
    """Re-raise a :class:`~deltaft.heads.HeadError` (no head found, or one of a kind that cannot
    be rebuilt) as a :class:`~deltaft.app.errors.SettingError` that names the ``head`` setting.

    Example:
        >>> from torch import nn
        >>> from deltaft.heads import find_head
        >>> try:
        ...     with head_as_setting():
        ...         find_head(nn.Sequential(nn.Conv2d(3, 3, 3)))
        ... except SettingError as error:
        ...     print(error.render(lambda key: "--" + key).split("; ")[1][:16])
        pass --head NAME
    """
    try:
        yield
    except HeadError as error:
        raise SettingError(
            f"{literal(error.problem)}; pass {{head}} NAME to name the classifier module."
        ) from error
