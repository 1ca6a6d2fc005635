"""Training and evaluation transforms: the model's pretrained recipe or the paper's protocol."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from torchvision import transforms as T

from deltaft.app.checks import at_least, in_range, integer
from deltaft.app.data.images import ToRGB
from deltaft.app.errors import SettingError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAX_IMAGE_SIZE",
    "MIN_IMAGE_SIZE",
    "Preset",
    "check_crop_scale",
    "check_hflip",
    "check_image_size",
    "check_transform_args",
    "eval_transform",
    "train_transform",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
_DEFAULT_CROP_PCT = 0.875  # eval: resize the short side to size / 0.875, then center-crop
_DEFAULT_CROP_SCALE = 0.25  # train: RandomResizedCrop keeps at least this share of the area

Preset = Literal["default", "paper"]


# The smallest image side: the stem of an ImageNet network (a stride-2 convolution, then
# stride-2 pooling or convolutions) leaves nothing to pool from fewer pixels.
MIN_IMAGE_SIZE = 8
# The largest: above every pretrained recipe (torchvision's largest, EfficientNet-B7, uses 600;
# timm's largest 800), while one batch of 32 images stays at 400 MB of input (3 x 1024 x 1024
# float32 is 12 MB an image) and an evaluation resize at 1170 pixels a side.
MAX_IMAGE_SIZE = 1024


def check_image_size(image_size: int) -> None:
    """``image_size`` is an integer in [:data:`MIN_IMAGE_SIZE`, :data:`MAX_IMAGE_SIZE`]
    ([8, 1024]).

    The one check of this setting: :class:`~deltaft.app.config.TrainConfig` and the transforms
    (so :func:`~deltaft.app.data.build_datasets`) both call it.

    Raises:
        SettingError: not an integer, below 8 or above 1024.
    """
    integer("image_size", image_size)
    at_least("image_size", image_size, MIN_IMAGE_SIZE)
    if image_size > MAX_IMAGE_SIZE:
        raise SettingError(
            f"{{image_size}} must be <= {MAX_IMAGE_SIZE}, got {image_size}; the largest "
            "pretrained recipes use 600 to 800 pixels."
        )


def check_hflip(hflip: float) -> None:
    """``hflip``, the probability of the training flip, is in [0, 1].

    Raises:
        SettingError: ``hflip`` outside [0, 1].
    """
    in_range("hflip", hflip, 0.0, 1.0)


def check_crop_scale(crop_scale: float | None, preset: str) -> None:
    """``crop_scale`` (``None``: the default 0.25) is in (0, 1], and only with the default preset.

    Raises:
        SettingError: ``crop_scale`` outside (0, 1], or given with the ``paper`` preset.
    """
    if crop_scale is None:
        return
    in_range("crop_scale", crop_scale, 0.0, 1.0, left_open=True)
    if preset == "paper":
        raise SettingError(
            "{crop_scale} sets the default preset's RandomResizedCrop; the paper preset "
            "crops a fixed size. Drop {crop_scale} or use {preset} default."
        )


def check_transform_args(
    image_size: int, preset: str, mean: Sequence[float], std: Sequence[float]
) -> None:
    """An integer size >= 8 (:func:`check_image_size`), a known preset, three means and three
    positive stds."""
    check_image_size(image_size)
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
    check_hflip(hflip)
    check_crop_scale(crop_scale, preset)
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
