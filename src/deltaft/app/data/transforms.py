"""Training and evaluation transforms: the model's pretrained recipe or the paper's protocol."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from torchvision import transforms as T

from deltaft.app.data.images import ToRGB
from deltaft.app.errors import SettingError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Preset",
    "check_transform_args",
    "eval_transform",
    "train_transform",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
_DEFAULT_CROP_PCT = 0.875  # eval: resize the short side to size / 0.875, then center-crop
_DEFAULT_CROP_SCALE = 0.25  # train: RandomResizedCrop keeps at least this share of the area

Preset = Literal["default", "paper"]


def check_transform_args(
    image_size: int, preset: str, mean: Sequence[float], std: Sequence[float]
) -> None:
    """A positive integer size, a known preset, three means and three positive stds."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}.")
    if preset not in ("default", "paper"):
        raise ValueError(f"Unknown preset {preset!r}; choose 'default' or 'paper'.")
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(
            f"mean and std need 3 values each (std > 0), got mean={list(mean)}, std={list(std)}."
        )


def _paper_resize(image_size: int) -> int:
    return round(image_size * 256 / 224)  # 224 -> 256, as in the reference code


def train_transform(
    image_size: int,
    preset: Preset = "default",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    hflip: float = 0.5,
    crop_scale: float | None = None,
) -> T.Compose:
    """The training transform: RGB conversion, augmentation, tensor, normalisation.

    * ``"default"``: ``RandomResizedCrop(image_size, scale=(crop_scale, 1))`` (``crop_scale``
      0.25 when ``None``) + horizontal flip.
    * ``"paper"`` (the reference protocol): ``Resize((r, r))`` with ``r = round(image_size *
      256 / 224)`` + ``RandomCrop(image_size)`` + horizontal flip; ``crop_scale`` must be ``None``.

    The flip happens with probability ``hflip``; 0 leaves it out (digits, text: data whose
    mirror image is another thing). Then ``ToTensor`` and ``Normalize(mean, std)``. Every step is
    a picklable class (no lambdas), so DataLoader workers can use it.
    """
    check_transform_args(image_size, preset, mean, std)
    if not 0.0 <= hflip <= 1.0:
        raise ValueError(f"hflip is a probability in [0, 1], got {hflip!r}; 0 turns flips off.")
    if crop_scale is not None and preset == "paper":
        raise SettingError(
            "crop_scale belongs to the default preset's RandomResizedCrop; the paper preset "
            "crops a fixed size. Drop {crop_scale} or use {preset} default."
        )
    if crop_scale is not None and not 0.0 < crop_scale <= 1.0:
        raise SettingError(
            f"crop_scale is the smallest area fraction a crop keeps, in (0, 1], got "
            f"{crop_scale!r}; e.g. {{crop_scale}} 0.5."
        )
    steps: list[Any] = [ToRGB()]
    if preset == "paper":
        side = _paper_resize(image_size)
        steps += [T.Resize((side, side)), T.RandomCrop(image_size)]
    else:
        smallest = _DEFAULT_CROP_SCALE if crop_scale is None else crop_scale
        steps += [T.RandomResizedCrop(image_size, scale=(smallest, 1.0))]
    if hflip > 0:
        steps += [T.RandomHorizontalFlip(hflip)]
    steps += [T.ToTensor(), T.Normalize(list(mean), list(std))]
    return T.Compose(steps)


def eval_transform(
    image_size: int,
    preset: Preset = "default",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> T.Compose:
    """The evaluation transform: RGB conversion, deterministic resize and center crop, tensor,
    normalisation.

    * ``"default"``: ``Resize(int(image_size / 0.875))`` (short side) + ``CenterCrop(image_size)``.
    * ``"paper"``: ``Resize((r, r))`` with ``r = round(image_size * 256 / 224)`` +
      ``CenterCrop(image_size)``.
    """
    check_transform_args(image_size, preset, mean, std)
    steps: list[Any] = [ToRGB()]
    if preset == "paper":
        side = _paper_resize(image_size)
        steps += [T.Resize((side, side))]
    else:
        steps += [T.Resize(int(image_size / _DEFAULT_CROP_PCT))]
    steps += [T.CenterCrop(image_size), T.ToTensor(), T.Normalize(list(mean), list(std))]
    return T.Compose(steps)
