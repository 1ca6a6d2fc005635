"""Datasets, transforms and stratified sampling for fine-tuning.

``build_datasets(data)`` accepts three layouts and returns the train, validation and test splits:

* ``DIR/train/<class>/*`` with optional ``DIR/val/<class>/*`` and ``DIR/test/<class>/*``. The class
  folders of ``val/`` and ``test/`` must be the same as those of ``train/``.
* A flat ``DIR/<class>/*``: split once into train and test, 80/20 per class
  (:func:`stratified_split` with ``TEST_FRACTION`` and the fixed seed ``TEST_SPLIT_SEED``, so every
  run seed evaluates on the same test images).
* ``tv:NAME``, a torchvision dataset (see ``TV_DATASETS``) under ``data_root``.

The training split can then be subsampled (``per_class`` or ``fraction``, stratified and seeded:
the 30/60-per-class and 15/30/50 % protocols), and a validation split can be carved out of what
remains (``val_split``). Model selection uses the validation split, never the test split.

Example::

    splits = build_datasets("flowers/", image_size=224, per_class=30, val_split=0.2, seed=1)
    loader = torch.utils.data.DataLoader(splits.train, batch_size=32, shuffle=True, num_workers=4)
"""

from __future__ import annotations

import logging
import math
import operator
import os
import stat
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torchvision
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision import transforms as T

from deltaft.app.errors import UserError

__all__ = [
    "DEFAULT_DATA_ROOT",
    "FAKEDATA_CLASSES",
    "FAKEDATA_SIZES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "TEST_FRACTION",
    "TEST_SPLIT_SEED",
    "TV_DATASETS",
    "DataSplits",
    "ImageFolder",
    "build_datasets",
    "eval_transform",
    "stratified_indices",
    "stratified_split",
    "train_transform",
    "write_image_folder",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
TEST_FRACTION = 0.2  # flat folders and Caltech256: share of each class held out for testing
TEST_SPLIT_SEED = 0  # the test split never depends on the run's seed
DEFAULT_DATA_ROOT = "~/.cache/deltaft/datasets"
FAKEDATA_SIZES: dict[str, int] = {"train": 200, "test": 100}
FAKEDATA_CLASSES = 5
_FAKEDATA_TEST_OFFSET = 1_000_000  # FakeData seeds image i with i + offset: disjoint train/test
_SPLIT_SALT = 0x5EED  # decorrelates held-out splits from per-class subsampling with the same seed
_SAMPLE_SALT = 0x5A3B
_DEFAULT_CROP_PCT = 0.875  # eval: resize the short side to size / 0.875, then center-crop
_DEFAULT_CROP_SCALE = 0.25  # train: RandomResizedCrop keeps at least this share of the area
_WHITE = (255, 255, 255)

Preset = Literal["default", "paper"]

# Constructor arguments of each split. "all" means the dataset has no split of its own and is
# divided like a flat folder. FGVCAircraft trains on "trainval" (6,667 images) as the published
# benchmark does (DESIGN.md); Flowers102 and DTD have their own validation split.
TV_DATASETS: dict[str, dict[str, dict[str, Any]]] = {
    "CIFAR10": {"train": {"train": True}, "test": {"train": False}},
    "CIFAR100": {"train": {"train": True}, "test": {"train": False}},
    "Caltech256": {"all": {}},
    "DTD": {"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}},
    "FGVCAircraft": {"train": {"split": "trainval"}, "test": {"split": "test"}},
    "FakeData": {"train": {}, "test": {}},
    "Flowers102": {"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}},
    "Food101": {"train": {"split": "train"}, "test": {"split": "test"}},
    "OxfordIIITPet": {"train": {"split": "trainval"}, "test": {"split": "test"}},
    "StanfordCars": {"train": {"split": "train"}, "test": {"split": "test"}},
}


# --------------------------------------------------------------------------------------------
# Image decoding


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _wide_gray_to_rgb(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float grayscale to 8-bit RGB.

    ``I;16*`` scales 0..65535 to 0..255; ``I`` keeps values up to 255, scales up to 65535 like
    ``I;16`` and anything larger by its maximum; ``F`` is taken as 0..1 when its maximum is <= 1,
    else as 0..255. Values are clipped to 0..255.
    """
    array = np.asarray(image, dtype=np.float64)
    peak = float(array.max()) if array.size else 0.0
    if image.mode.startswith("I;16"):
        scale = 255.0 / 65535.0
    elif image.mode == "F":
        scale = 255.0 if peak <= 1.0 else 1.0
    elif peak <= 255.0:
        scale = 1.0
    else:
        scale = 255.0 / 65535.0 if peak <= 65535.0 else 255.0 / peak
    gray = np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparent pixels are composited on white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "RGBa", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, _WHITE)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if mode.startswith("I") or mode == "F":
        return _wide_gray_to_rgb(image)
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def _load_rgb(path: str) -> Image.Image:
    """Decode ``path`` fully (so corrupt or truncated data fails here) and return an RGB copy.

    Raises:
        OSError: not a regular file (a FIFO or a device would block or never end), or any
            error of reading it.
    """
    if not stat.S_ISREG(os.stat(path).st_mode):  # follows symlinks; ELOOP raises here
        raise OSError(f"{path} is not a regular file")
    with Image.open(path) as image:
        image.load()
        try:
            upright = ImageOps.exif_transpose(image)  # a new image, rotated as the camera meant
        except Exception:  # a malformed EXIF block must not make a decodable image unreadable
            upright = image.copy()
    return _to_rgb(upright)


class _ToRGB:
    """Transform: convert a PIL image of any mode to RGB.

    A class rather than a lambda, so DataLoader workers can pickle it. Grayscale datasets (MNIST)
    then feed 3-channel networks.
    """

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == "RGB" else _to_rgb(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# --------------------------------------------------------------------------------------------
# Image folders


def _scan_images(folder: Path) -> list[str]:
    """Image files under ``folder``, recursively, following symlinks but visiting each real
    directory once (no symlink loops), hidden files and folders ignored, sorted."""
    found: list[str] = []
    seen: set[str] = set()
    stack = [folder]
    while stack:
        current = stack.pop()
        real = os.path.realpath(current)
        if real in seen:
            continue
        seen.add(real)
        try:
            with os.scandir(current) as it:
                entries = sorted(it, key=operator.attrgetter("name"))
        except OSError as exc:
            raise UserError(
                f"Cannot list {current} ({exc.strerror or exc}); check that it is readable."
            ) from exc
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if _is_dir(entry):
                stack.append(Path(entry.path))
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(entry.path)  # a broken one is skipped with a warning when read
    return sorted(found)


def _is_dir(entry: os.DirEntry[str]) -> bool:
    """``entry.is_dir()`` following symlinks; ``False`` for a symlink loop (ELOOP)."""
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


def _class_folders(root: Path) -> list[str]:
    if not root.exists():
        raise UserError(
            f"Data folder {root} does not exist; pass an existing folder laid out as "
            "DIR/<class>/<images> or DIR/train/<class>/<images>."
        )
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; pass a folder of class folders DIR/<class>/.")
    with os.scandir(root) as it:
        names = sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())
    if not names:
        raise UserError(
            f"Data folder {root} has no class folders; put the images of each class in "
            f"{root}/<class>/."
        )
    return names


class ImageFolder(Dataset[tuple[Any, int]]):
    """Images under ``root/<class>/**``; class index = position of the class folder in sorted order.

    The constructor lists files (extensions in ``IMAGE_EXTENSIONS``, case-insensitive; hidden files
    and folders ignored; sub-folders and symlinks followed, each real folder once) and checks only
    that every class folder holds at least one candidate file. Images are decoded in
    ``__getitem__``, with EXIF orientation applied, and converted to RGB from any mode (L, P, RGBA,
    LA, CMYK, I;16, ...): transparency is composited on white, 16-bit grayscale scaled to 8 bits.

    An unreadable file is skipped: ``__getitem__`` logs one warning naming it, adds its path to
    ``skipped`` and returns the next readable sample (index + 1, + 2, ... modulo ``len``) with that
    sample's own label. With DataLoader workers, ``skipped`` fills in the worker processes; call
    :meth:`verify` in the main process for a complete list.

    Args:
        root: the folder of class folders.
        transform: applied to the RGB ``PIL.Image``.
        classes: the expected class folder names in label order (e.g. those of the training split);
            the folders under ``root`` must be exactly these. Default: the sorted folder names.

    Attributes:
        classes: class names, index = label.
        class_to_idx: name -> label.
        samples: ``(path, label)`` pairs, sorted by class then path.
        targets: the labels of ``samples``.
        skipped: paths found unreadable so far.

    Raises:
        UserError: ``root`` is missing or has no class folders, the class folders differ from
            ``classes``, or a class folder has no image file.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        classes: list[str] | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        self.transform = transform
        found = _class_folders(self.root)
        if classes is not None and sorted(classes) != found:
            missing = sorted(set(classes) - set(found))
            extra = sorted(set(found) - set(classes))
            raise UserError(
                f"Class folders of {self.root} differ from the training classes "
                f"(missing: {', '.join(missing) or '-'}; unexpected: {', '.join(extra) or '-'}); "
                "use the same class folder names in train/, val/ and test/."
            )
        self.classes: list[str] = list(classes) if classes is not None else found
        self.class_to_idx: dict[str, int] = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            files = _scan_images(self.root / name)
            if not files:
                raise UserError(
                    f"Class folder {self.root / name} has no image files "
                    f"({' '.join(IMAGE_EXTENSIONS)}); add images or remove the folder."
                )
            self.samples.extend((path, label) for path in files)
        self.targets: list[int] = [label for _, label in self.samples]
        self.skipped: set[str] = set()

    def subset(
        self, indices: Sequence[int], *, transform: Callable[[Image.Image], Any] | None = None
    ) -> ImageFolder:
        """A new ``ImageFolder`` over ``samples[i] for i in indices``, without re-scanning.

        Skipping stays inside the subset: a corrupt training image is replaced by another training
        image, never by a test image. ``transform`` replaces this folder's transform.
        """
        new = ImageFolder.__new__(ImageFolder)
        new.root = self.root
        new.transform = transform
        new.classes = list(self.classes)
        new.class_to_idx = dict(self.class_to_idx)
        new.samples = [self.samples[i] for i in indices]
        new.targets = [label for _, label in new.samples]
        new.skipped = set()
        return new

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        for step in range(n):
            path, label = self.samples[(index + step) % n]
            if path in self.skipped:
                continue
            try:
                image = _load_rgb(path)
            # PIL raises many exception types on bad files (OSError, SyntaxError, ValueError, ...)
            except Exception as exc:
                self._skip(path, exc)
                continue
            return (self.transform(image) if self.transform is not None else image), label
        raise UserError(
            f"None of the {n} images under {self.root} could be read; check the files "
            "(the warnings above name them) or re-save them as PNG or JPEG."
        )

    def _skip(self, path: str, exc: Exception) -> None:
        self.skipped.add(path)
        logger.warning(
            "Skipping unreadable image %s (%s: %s).", path, type(exc).__name__, _one_line(exc)
        )

    def verify(self) -> list[str]:
        """Decode every image once; record the unreadable ones in ``skipped``, return them sorted.

        This reads the whole folder: use it for a complete count when DataLoader workers did the
        loading (their ``skipped`` sets stay in the worker processes).
        """
        for path, _ in self.samples:
            if path in self.skipped:
                continue
            try:
                _load_rgb(path)
            except Exception as exc:
                self._skip(path, exc)
        return sorted(self.skipped)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, images={len(self)}, "
            f"classes={len(self.classes)})"
        )


class _TransformedSubset(Dataset[tuple[Any, int]]):
    """``base[indices[i]]`` with ``transform`` applied to the image (torchvision datasets)."""

    def __init__(
        self,
        base: Dataset[Any],
        indices: Sequence[int],
        transform: Callable[[Any], Any] | None,
    ) -> None:
        self.base = base
        self.indices = list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.base[self.indices[index]]
        return (self.transform(image) if self.transform is not None else image), int(label)


# --------------------------------------------------------------------------------------------
# Stratified sampling


def _by_class(targets: Sequence[int]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(targets):
        groups[int(label)].append(index)
    return dict(sorted(groups.items()))


def _permuted(indices: list[int], seed: int, label: int, salt: int) -> list[int]:
    """``indices`` shuffled by a generator that depends only on (seed, label, salt)."""
    mask = (1 << 64) - 1  # SeedSequence takes non-negative integers; negative seeds wrap around
    rng = np.random.default_rng([salt, label & mask, seed & mask])
    return [indices[i] for i in rng.permutation(len(indices))]


def _check_sampling(per_class: int | None, fraction: float | None) -> None:
    if per_class is not None and fraction is not None:
        raise UserError(
            f"per_class={per_class} and fraction={fraction} were both given; "
            "pass --per-class or --fraction, not both."
        )
    if per_class is not None and (
        isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1
    ):
        raise UserError(
            f"per_class must be an integer >= 1, got {per_class!r}; e.g. --per-class 30."
        )
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise UserError(f"fraction must be in (0, 1], got {fraction!r}; e.g. --fraction 0.15.")


def stratified_indices(
    targets: Sequence[int],
    *,
    per_class: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
) -> list[int]:
    """Indices of a seeded, class-balanced subsample of a dataset with labels ``targets``.

    Each class is shuffled by a generator seeded with ``(seed, class)`` and its first ``k`` indices
    are kept, with ``k = min(per_class, n_c)`` or ``k = max(1, round(fraction * n_c))`` (halves
    rounded up). Because the shuffle does not depend on ``k``, subsamples with the same seed are
    nested: 30 per class is a subset of 60 per class, 15 % of 30 %. A class with fewer than
    ``per_class`` images keeps them all and is reported in one warning.

    Args:
        targets: the label of every sample.
        per_class: images to keep per class.
        fraction: share of each class to keep, in (0, 1].
        seed: the sampling seed.

    Returns:
        Sorted indices into ``targets``; all of them when neither ``per_class`` nor ``fraction``
        is given.

    Raises:
        UserError: both options given, ``per_class < 1`` or ``fraction`` outside (0, 1].

    Example:
        >>> stratified_indices([0, 0, 0, 1, 1, 1], per_class=2, seed=0)  # doctest: +SKIP
        [0, 2, 3, 5]
    """
    _check_sampling(per_class, fraction)
    if per_class is None and fraction is None:
        return list(range(len(targets)))
    keep: list[int] = []
    short: list[tuple[int, int]] = []
    for label, members in _by_class(targets).items():
        n = len(members)
        if per_class is not None:
            k = min(per_class, n)
            if n < per_class:
                short.append((label, n))
        else:
            assert fraction is not None
            k = min(n, max(1, math.floor(fraction * n + 0.5)))
        keep.extend(_permuted(members, seed, label, _SAMPLE_SALT)[:k])
    if short:
        listed = ", ".join(f"class {label}: {n}" for label, n in short[:8])
        more = ", ..." if len(short) > 8 else ""
        logger.warning(
            "per_class=%d: %d of %d classes have fewer images and keep all of them (%s%s).",
            per_class,
            len(short),
            len(_by_class(targets)),
            listed,
            more,
        )
    return sorted(keep)


def stratified_split(
    targets: Sequence[int], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Split indices into ``(rest, held_out)``, holding out about ``fraction`` of every class.

    A class with ``n >= 2`` samples holds out ``k = clamp(round(fraction * n), 1, n - 1)`` of them
    (halves rounded up), chosen by a generator seeded with ``(seed, class)``; a class with a single
    sample stays in ``rest``. Both lists are sorted.

    Raises:
        UserError: ``fraction`` is not in (0, 1).
    """
    if not 0.0 < fraction < 1.0:
        raise UserError(
            f"A held-out fraction must be in (0, 1), got {fraction!r}; e.g. --val-split 0.2."
        )
    rest: list[int] = []
    held: list[int] = []
    for label, members in _by_class(targets).items():
        n = len(members)
        k = 0 if n < 2 else min(n - 1, max(1, math.floor(fraction * n + 0.5)))
        shuffled = _permuted(members, seed, label, _SPLIT_SALT)
        held.extend(shuffled[:k])
        rest.extend(shuffled[k:])
    return sorted(rest), sorted(held)


# --------------------------------------------------------------------------------------------
# Transforms


def _check_transform_args(
    image_size: int, preset: str, mean: Sequence[float], std: Sequence[float]
) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise UserError(f"image_size must be a positive integer, got {image_size!r}.")
    if preset not in ("default", "paper"):
        raise UserError(f"Unknown preset {preset!r}; choose 'default' or 'paper'.")
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise UserError(
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
    _check_transform_args(image_size, preset, mean, std)
    if not 0.0 <= hflip <= 1.0:
        raise UserError(f"hflip is a probability in [0, 1], got {hflip!r}; 0 turns flips off.")
    if crop_scale is not None and preset == "paper":
        raise UserError(
            "crop_scale belongs to the default preset's RandomResizedCrop; the paper preset "
            "crops a fixed size. Drop --crop-scale or use --preset default."
        )
    if crop_scale is not None and not 0.0 < crop_scale <= 1.0:
        raise UserError(
            f"crop_scale is the smallest area fraction a crop keeps, in (0, 1], got "
            f"{crop_scale!r}; e.g. --crop-scale 0.5."
        )
    steps: list[Any] = [_ToRGB()]
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
    _check_transform_args(image_size, preset, mean, std)
    steps: list[Any] = [_ToRGB()]
    if preset == "paper":
        side = _paper_resize(image_size)
        steps += [T.Resize((side, side))]
    else:
        steps += [T.Resize(int(image_size / _DEFAULT_CROP_PCT))]
    steps += [T.CenterCrop(image_size), T.ToTensor(), T.Normalize(list(mean), list(std))]
    return T.Compose(steps)


# --------------------------------------------------------------------------------------------
# Sources: where the splits come from, before sampling and transforms


@dataclass
class _Source:
    """Untransformed base datasets and the indices of each split into them."""

    name: str
    classes: list[str]
    train: tuple[Dataset[Any], list[int]]
    val: tuple[Dataset[Any], list[int]] | None
    test: tuple[Dataset[Any], list[int]] | None


def _all(dataset: Dataset[Any]) -> tuple[Dataset[Any], list[int]]:
    return dataset, list(range(len(dataset)))  # type: ignore[arg-type]


def _folder_source(root: Path) -> _Source:
    if not root.exists():
        raise UserError(
            f"Data folder {root} does not exist; pass --data DIR with DIR/<class>/<images> or "
            "DIR/train/<class>/<images>, or tv:NAME for a torchvision dataset."
        )
    if (root / "train").is_dir():
        train = ImageFolder(root / "train")
        val = ImageFolder(root / "val", classes=train.classes) if (root / "val").is_dir() else None
        test = (
            ImageFolder(root / "test", classes=train.classes) if (root / "test").is_dir() else None
        )
        return _Source(
            str(root),
            train.classes,
            _all(train),
            _all(val) if val is not None else None,
            _all(test) if test is not None else None,
        )
    if (root / "val").is_dir() or (root / "test").is_dir():
        raise UserError(
            f"{root} has a val/ or test/ folder but no train/ folder; add {root}/train/<class>/ "
            f"or use a flat layout {root}/<class>/ without split folders."
        )
    everything = ImageFolder(root)
    rest, held = stratified_split(everything.targets, TEST_FRACTION, seed=TEST_SPLIT_SEED)
    logger.info(
        "%s has no train/ folder: split it %d/%d per class into train and test (seed %d).",
        root,
        round(100 * (1 - TEST_FRACTION)),
        round(100 * TEST_FRACTION),
        TEST_SPLIT_SEED,
    )
    return _Source(str(root), everything.classes, (everything, rest), None, (everything, held))


def _targets_of(dataset: Dataset[Any]) -> list[int]:
    """The label of every sample, from a label attribute when the dataset has one."""
    size = len(dataset)  # type: ignore[arg-type]
    for attr in ("targets", "_labels", "y", "labels"):
        values = getattr(dataset, attr, None)
        if values is not None and len(values) == size:
            return [int(v) for v in values]
    for attr in ("_samples", "samples"):
        pairs = getattr(dataset, attr, None)
        if pairs is not None and len(pairs) == size and all(len(p) == 2 for p in pairs):
            return [int(p[1]) for p in pairs]
    logger.info("Reading all %d labels of %s one by one (no label attribute).", size, dataset)
    return [int(dataset[i][1]) for i in range(size)]


def _classes_of(dataset: Dataset[Any], targets: Callable[[], list[int]]) -> list[str]:
    for attr in ("classes", "categories"):
        names = getattr(dataset, attr, None)
        if isinstance(names, list | tuple) and names:
            return [str(n) for n in names]
    count = getattr(dataset, "num_classes", None)
    if not isinstance(count, int):
        count = max(targets(), default=-1) + 1
    return [str(i) for i in range(count)]


def _open_tv(name: str, root: Path, download: bool, kwargs: dict[str, Any]) -> Dataset[Any]:
    cls = getattr(torchvision.datasets, name)
    try:
        return cls(root=str(root), download=download, **kwargs)
    except (RuntimeError, OSError, ValueError, HTTPException) as exc:
        if download:
            raise UserError(
                f"Could not download tv:{name} into {root} ({_one_line(exc)}); check the network, "
                "or download it by hand into --data-root DIR."
            ) from exc
        raise UserError(
            f"tv:{name} not found under {root} ({_one_line(exc)}); pass --download on a machine "
            "with internet, or --data-root DIR where it was downloaded."
        ) from exc


def _tv_source(name: str, root: Path, download: bool, image_size: int) -> _Source:
    canonical = {k.lower(): k for k in TV_DATASETS}.get(name.lower())
    if canonical is None:
        supported = ", ".join(f"tv:{k}" for k in sorted(TV_DATASETS))
        raise UserError(f"Unknown torchvision dataset tv:{name}; supported: {supported}.")
    splits = TV_DATASETS[canonical]
    if canonical == "FakeData":
        shape = (3, image_size, image_size)
        bases: dict[str, Dataset[Any]] = {
            "train": torchvision.datasets.FakeData(
                FAKEDATA_SIZES["train"], shape, FAKEDATA_CLASSES, random_offset=0
            ),
            "test": torchvision.datasets.FakeData(
                FAKEDATA_SIZES["test"], shape, FAKEDATA_CLASSES, random_offset=_FAKEDATA_TEST_OFFSET
            ),
        }
    else:
        bases = {split: _open_tv(canonical, root, download, kw) for split, kw in splits.items()}
    first = bases.get("train", bases.get("all"))
    assert first is not None
    classes = _classes_of(first, lambda: _targets_of(first))
    label = f"tv:{canonical}"
    if "all" in bases:
        rest, held = stratified_split(_targets_of(first), TEST_FRACTION, seed=TEST_SPLIT_SEED)
        logger.info(
            "%s has no test split: holding out %d%% per class (seed %d).",
            label,
            round(100 * TEST_FRACTION),
            TEST_SPLIT_SEED,
        )
        return _Source(label, classes, (first, rest), None, (first, held))
    return _Source(
        label,
        classes,
        _all(first),
        _all(bases["val"]) if "val" in bases else None,
        _all(bases["test"]) if "test" in bases else None,
    )


def _view(
    pool: tuple[Dataset[Any], list[int]], transform: Callable[[Any], Any]
) -> Dataset[tuple[Any, int]]:
    base, indices = pool
    if isinstance(base, ImageFolder):
        return base.subset(indices, transform=transform)
    return _TransformedSubset(base, indices, transform)


# --------------------------------------------------------------------------------------------
# Public entry point


@dataclass
class DataSplits:
    """The datasets of one run; each yields ``(image tensor, label)``.

    Attributes:
        train: the (subsampled) training split, with the training transform.
        val: the validation split (evaluation transform), or ``None``.
        test: the test split (evaluation transform), or ``None``.
        classes: class names, index = label, shared by all splits.
        folders: the ``ImageFolder`` datasets behind the splits (empty for torchvision datasets).
    """

    train: Dataset[Any]
    val: Dataset[Any] | None
    test: Dataset[Any] | None
    classes: list[str]
    folders: list[ImageFolder] = field(default_factory=list, repr=False)

    @property
    def num_classes(self) -> int:
        """``len(classes)``."""
        return len(self.classes)

    def skipped(self) -> list[str]:
        """Sorted paths of the files skipped as unreadable so far (in this process)."""
        return sorted(set().union(*(folder.skipped for folder in self.folders)))

    def verify(self) -> list[str]:
        """Decode every image of every split once and return the sorted unreadable paths."""
        for folder in self.folders:
            folder.verify()
        return self.skipped()


def build_datasets(
    data: str,
    *,
    image_size: int = 224,
    preset: Preset = "default",
    hflip: float = 0.5,
    crop_scale: float | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    per_class: int | None = None,
    fraction: float | None = None,
    val_split: float = 0.0,
    seed: int = 0,
    download: bool = False,
    data_root: str | None = None,
) -> DataSplits:
    """Build the train/val/test datasets of ``data`` with transforms, sampling and splits.

    Steps, in order:

    1. Sources (see the module docstring): ``DIR/train|val|test``, a flat ``DIR/<class>/``
       (80/20 per class into train/test with the fixed ``TEST_SPLIT_SEED``), or ``tv:NAME`` under
       ``data_root`` (default ``~/.cache/deltaft/datasets``; splits in ``TV_DATASETS``;
       Caltech256 is split like a flat folder; ``tv:FakeData`` is ``FAKEDATA_SIZES`` random images
       of ``image_size`` pixels in ``FAKEDATA_CLASSES`` classes, for tests).
    2. ``per_class`` / ``fraction`` subsample the training split (:func:`stratified_indices`,
       seeded with ``seed``).
    3. ``val_split > 0`` holds out that share of every class of the subsampled training split
       as validation (:func:`stratified_split`, seeded with ``seed``). When the source has its own
       validation split (``DIR/val``, Flowers102, DTD), that split is used and ``val_split`` is
       ignored with a warning.
    4. Training images get :func:`train_transform` (with ``hflip`` and ``crop_scale``),
       validation and test images :func:`eval_transform`.

    Returns:
        The splits; ``val`` and ``test`` are ``None`` when the source has none.

    Raises:
        UserError: a missing or empty folder, a class folder without images, class folders that
            differ between splits, an unknown ``tv:`` name, a torchvision dataset that is not on
            disk (without ``download``), or an invalid option.
    """
    _check_sampling(per_class, fraction)
    if not 0.0 <= val_split < 1.0:
        raise UserError(
            f"val_split must be in [0, 1), got {val_split!r}; e.g. --val-split 0.2 (0 disables it)."
        )
    train_tf = train_transform(image_size, preset, mean, std, hflip=hflip, crop_scale=crop_scale)
    eval_tf = eval_transform(image_size, preset, mean, std)
    if data.startswith("tv:"):
        root = Path(data_root or DEFAULT_DATA_ROOT).expanduser()
        source = _tv_source(data[3:], root, download, image_size)
    else:
        source = _folder_source(Path(data).expanduser())

    base, indices = source.train
    targets: list[int] = []
    if per_class is not None or fraction is not None or (val_split > 0 and source.val is None):
        all_targets = _targets_of(base)
        targets = [all_targets[i] for i in indices]
    if per_class is not None or fraction is not None:
        keep = stratified_indices(targets, per_class=per_class, fraction=fraction, seed=seed)
        indices = [indices[k] for k in keep]
        targets = [targets[k] for k in keep]
    val = source.val
    if val_split > 0 and val is not None:
        logger.warning(
            "val_split=%g ignored: %s has its own validation split.", val_split, source.name
        )
    elif val_split > 0:
        rest, held = stratified_split(targets, val_split, seed=seed)
        val = (base, [indices[k] for k in held])
        indices = [indices[k] for k in rest]

    splits = DataSplits(
        train=_view((base, indices), train_tf),
        val=_view(val, eval_tf) if val is not None else None,
        test=_view(source.test, eval_tf) if source.test is not None else None,
        classes=source.classes,
    )
    splits.folders = [
        d for d in (splits.train, splits.val, splits.test) if isinstance(d, ImageFolder)
    ]
    logger.info(
        "%s: %d classes; train %d, val %s, test %s images.",
        source.name,
        len(source.classes),
        len(indices),
        len(val[1]) if val is not None else "none",
        len(source.test[1]) if source.test is not None else "none",
    )
    return splits


# --------------------------------------------------------------------------------------------
# Writing image folders


def _array_to_image(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise UserError(
            f"Expected an image array of shape (H, W), (H, W, 3) or (H, W, 4), got "
            f"{array.shape}; reshape flat or channel-first arrays first (MNIST: x.reshape(28, 28))."
        )
    if array.dtype == np.uint8:
        return Image.fromarray(array)
    values = array.astype(np.float64)
    if array.dtype == np.bool_ or (
        np.issubdtype(array.dtype, np.floating) and values.size and values.max() <= 1.0
    ):
        values = values * 255.0  # booleans and floats in [0, 1]
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def write_image_folder(
    root: str | Path,
    images: Iterable[tuple[Image.Image | np.ndarray, int]],
    classes: list[str],
    split: str = "train",
) -> Path:
    """Write ``(image, label)`` pairs as PNG files ``root/split/<class>/<i>.png``.

    ``i`` is the pair's position in ``images``, zero-padded to 5 digits; files of an earlier call
    with the same names are overwritten. Every class folder is created, even one without images.
    Arrays may be ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)``: ``uint8`` as is, floats
    with maximum <= 1 and booleans scaled by 255, other values rounded and clipped to 0..255.

    Returns:
        The split folder ``root/split``, ready for :class:`ImageFolder`.

    Raises:
        UserError: a class name that is not a plain folder name, a label outside
            ``range(len(classes))``, or an array of another shape.
    """
    out = Path(root).expanduser() / split
    for name in classes:
        if not name or name.startswith(".") or "/" in name or "\\" in name:
            raise UserError(
                f"Class name {name!r} cannot be a folder name; use a non-empty name without "
                "slashes that does not start with '.'."
            )
        (out / name).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(images):
        if not 0 <= int(label) < len(classes):
            raise UserError(
                f"Label {label} of image {i} is outside 0..{len(classes) - 1}; "
                "pass one class name per label."
            )
        pil = image if isinstance(image, Image.Image) else _array_to_image(np.asarray(image))
        pil.save(out / classes[int(label)] / f"{i:05d}.png")
    return out
