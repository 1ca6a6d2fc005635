"""Image folders: ``root/<class>/**`` read as a dataset that skips unreadable files, and written
from arrays."""

from __future__ import annotations

import logging
import operator
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from deltaft.app.data.images import load_rgb, one_line

__all__ = ["IMAGE_EXTENSIONS", "ImageFolder", "class_folders", "scan_images", "write_image_folder"]

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


def scan_images(folder: Path) -> list[str]:
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
            raise ValueError(
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


def class_folders(root: Path) -> list[str]:
    """The sorted names of the class folders directly under ``root`` (hidden ones ignored)."""
    if not root.exists():
        raise ValueError(
            f"Data folder {root} does not exist; pass an existing folder laid out as "
            "DIR/<class>/<images> or DIR/train/<class>/<images>."
        )
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder; pass a folder of class folders DIR/<class>/.")
    with os.scandir(root) as it:
        names = sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())
    if not names:
        raise ValueError(
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
    :meth:`verify` in the main process for a complete list, then :meth:`drop_skipped` to take the
    unreadable files out of ``samples``. With ``skip_unreadable=False`` (evaluated splits, where a
    stand-in image would be counted twice) an unreadable file raises ``OSError`` instead.

    Args:
        root: the folder of class folders.
        transform: applied to the RGB ``PIL.Image``.
        classes: the expected class folder names in label order (e.g. those of the training split);
            the folders under ``root`` must be exactly these. Default: the sorted folder names.
        skip_unreadable: skip an unreadable file as above (``True``) or raise (``False``).

    Attributes:
        classes: class names, index = label.
        class_to_idx: name -> label.
        samples: ``(path, label)`` pairs, sorted by class then path.
        targets: the labels of ``samples``.
        skipped: paths found unreadable so far.
        skip_unreadable: the constructor argument.

    Raises:
        ValueError: ``root`` is missing or has no class folders, the class folders differ from
            ``classes``, or a class folder has no image file.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        classes: list[str] | None = None,
        skip_unreadable: bool = True,
    ) -> None:
        self.root = Path(root).expanduser()
        self.transform = transform
        self.skip_unreadable = skip_unreadable
        found = class_folders(self.root)
        if classes is not None and sorted(classes) != found:
            missing = sorted(set(classes) - set(found))
            extra = sorted(set(found) - set(classes))
            raise ValueError(
                f"Class folders of {self.root} differ from the training classes "
                f"(missing: {', '.join(missing) or '-'}; unexpected: {', '.join(extra) or '-'}); "
                "use the same class folder names in train/, val/ and test/."
            )
        self.classes: list[str] = list(classes) if classes is not None else found
        self.class_to_idx: dict[str, int] = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            files = scan_images(self.root / name)
            if not files:
                raise ValueError(
                    f"Class folder {self.root / name} has no image files "
                    f"({' '.join(IMAGE_EXTENSIONS)}); add images or remove the folder."
                )
            self.samples.extend((path, label) for path in files)
        self.targets: list[int] = [label for _, label in self.samples]
        self.skipped: set[str] = set()

    def subset(
        self,
        indices: Sequence[int],
        *,
        transform: Callable[[Image.Image], Any] | None = None,
        skip_unreadable: bool = True,
    ) -> ImageFolder:
        """A new ``ImageFolder`` over ``samples[i] for i in indices``, without re-scanning.

        Skipping stays inside the subset: a corrupt training image is replaced by another training
        image, never by a test image. ``transform`` and ``skip_unreadable`` replace this folder's.
        """
        new = ImageFolder.__new__(ImageFolder)
        new.root = self.root
        new.transform = transform
        new.skip_unreadable = skip_unreadable
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
        for step in range(n if self.skip_unreadable else 1):
            path, label = self.samples[(index + step) % n]
            if path in self.skipped and self.skip_unreadable:
                continue
            try:
                image = load_rgb(path)
            # PIL raises many exception types on bad files (OSError, SyntaxError, ValueError, ...)
            except Exception as exc:
                if not self.skip_unreadable:
                    raise OSError(
                        f"{path} could not be read during evaluation ({type(exc).__name__}: "
                        f"{one_line(exc)}); an evaluated image is never replaced by another one: "
                        "fix or remove the file and run again."
                    ) from exc
                self._skip(path, exc)
                continue
            return (self.transform(image) if self.transform is not None else image), label
        raise ValueError(
            f"None of the {n} images under {self.root} could be read; check the files "
            "(the warnings above name them) or re-save them as PNG or JPEG."
        )

    def _skip(self, path: str, exc: Exception) -> None:
        self.skipped.add(path)
        logger.warning(
            "Skipping unreadable image %s (%s: %s).", path, type(exc).__name__, one_line(exc)
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
                load_rgb(path)
            except Exception as exc:
                self._skip(path, exc)
        return sorted(self.skipped)

    def drop_skipped(self) -> int:
        """Take the files in ``skipped`` out of ``samples`` and ``targets``; return how many.

        After :meth:`verify`, the folder then holds only images that decoded, and ``len`` is
        their count.
        """
        before = len(self.samples)
        self.samples = [(path, label) for path, label in self.samples if path not in self.skipped]
        self.targets = [label for _, label in self.samples]
        return before - len(self.samples)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, images={len(self)}, "
            f"classes={len(self.classes)})"
        )


def _array_to_image(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(
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
        ValueError: a class name that is not a plain folder name, a label outside
            ``range(len(classes))``, or an array of another shape.
    """
    out = Path(root).expanduser() / split
    for name in classes:
        if not name or name.startswith(".") or "/" in name or "\\" in name:
            raise ValueError(
                f"Class name {name!r} cannot be a folder name; use a non-empty name without "
                "slashes that does not start with '.'."
            )
        (out / name).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(images):
        if not 0 <= int(label) < len(classes):
            raise ValueError(
                f"Label {label} of image {i} is outside 0..{len(classes) - 1}; "
                "pass one class name per label."
            )
        pil = image if isinstance(image, Image.Image) else _array_to_image(np.asarray(image))
        pil.save(out / classes[int(label)] / f"{i:05d}.png")
    return out
