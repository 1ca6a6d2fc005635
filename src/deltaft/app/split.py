"""Fixed per-class train/test splits of an image folder, written once and reused by every run.

``split_per_class("256_ObjectCategories", "data/caltech256-30", train_per_class=30,
test_per_class=20, exclude=["257.clutter"])`` reads ``SRC/<class>/**`` (files found as
:class:`deltaft.app.data.ImageFolder` finds them) and writes::

    DST/train/<class>/<file>    train_per_class images of every class
    DST/test/<class>/<file>     test_per_class other images of every class
    DST/split.json              the arguments, the counts and every file, to reproduce and audit

``DST/<split>/<path>`` is a link to (or a copy of) ``SRC/<path>``: a file in a sub-folder of its
class keeps that sub-folder, so equal file names in different sub-folders never collide. ``DST`` is
a normal image folder for ``deltaft train --data DST``.

How the images are chosen: the files of each class are ordered by
``sha256(f"{seed}\\0{class}\\0{path}")`` (``path`` relative to the class folder, with ``/``;
UTF-8) and the first ``test_per_class`` go to test, the next ``train_per_class`` to train. The
order depends only on the seed and the names, not on the machine, the file system's listing
order or the Python and NumPy versions (whose shuffles are not promised to stay the same). Test
comes first so that, with the same seed, the 30- and 60-per-class splits share their test images
and the 30 training images are among the 60.

``DST`` is written as ``DST.partial-XXXXXXXX`` next to it, ``split.json`` last, then renamed: a
``DST`` with a ``split.json`` is complete. A failed split removes its partial folder; a killed one
leaves it (delete it by hand). ``SRC`` is only read.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from deltaft._utils import atomic_directory
from deltaft.app.data import class_folders, scan_images
from deltaft.app.errors import SettingError, literal

__all__ = ["MANIFEST", "Link", "SplitResult", "split_per_class"]

logger = logging.getLogger(__name__)

Link = Literal["symlink", "hardlink", "copy"]
MANIFEST = "split.json"
_FORMAT = 1  # version of split.json's layout
_SHOWN = 5  # classes listed in the "too few images" error


@dataclass(frozen=True)
class SplitResult:
    """What :func:`split_per_class` wrote.

    Attributes:
        dst: the split folder (``dst/train``, ``dst/test``, ``dst/split.json``).
        classes: the class folder names, sorted (excluded ones left out).
        train: the training files, as paths relative to ``SRC`` with ``/``, sorted.
        test: the test files, likewise.
    """

    dst: Path
    classes: tuple[str, ...]
    train: tuple[str, ...]
    test: tuple[str, ...]

    @property
    def manifest(self) -> Path:
        """``dst / "split.json"``."""
        return self.dst / MANIFEST


# ------------------------------------------------------------------------------------------------
# Choosing the files
# ------------------------------------------------------------------------------------------------
def _ordered(name: str, files: Iterable[str], seed: int) -> list[str]:
    """``files`` (relative to the class folder) in the seeded order of the module docstring."""

    def key(path: str) -> str:
        text = f"{seed}\0{name}\0{path}"
        return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()

    return sorted(files, key=key)


def _check_count(value: Any, name: str, example: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SettingError(
            f"{{{name}}} must be a positive integer, got {literal(repr(value))}; e.g. {{{name}}} "
            f"{example}."
        )


def _check_src(src: Path) -> None:
    if not src.exists():
        raise FileNotFoundError(
            f"Source folder {src} does not exist; pass a folder of class folders SRC/<class>/ "
            "(for Caltech-256, the extracted 256_ObjectCategories)."
        )
    if not src.is_dir():
        raise ValueError(f"{src} is not a folder; pass a folder of class folders SRC/<class>/.")


def _check_dst(src: Path, dst: Path) -> None:
    real_src, real_dst = src.resolve(), dst.resolve()
    if real_dst == real_src or real_src in real_dst.parents:
        raise ValueError(
            f"Destination {dst} is inside the source folder {src}; pick a folder outside it "
            "(the source is never modified)."
        )
    if dst.is_symlink():
        raise ValueError(f"Destination {dst} is a symbolic link; pick a folder that is not one.")
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"Destination {dst} exists and is not a folder; pick another folder.")
    if dst.is_dir() and any(dst.iterdir()):
        raise ValueError(
            f"Destination {dst} exists and is not empty; pick another folder (nothing in it is "
            "overwritten or deleted)."
        )


def _classes(src: Path, exclude: Iterable[str]) -> list[str]:
    found = class_folders(src)
    excluded = set(exclude)
    unknown = sorted(excluded - set(found))
    if unknown:
        raise SettingError(
            f"{{exclude}} names no class folder of {literal(src)}: {literal(', '.join(unknown))}; "
            f"class folders are named like {literal(', '.join(found[:3]))}."
        )
    kept = [name for name in found if name not in excluded]
    if not kept:
        raise ValueError(f"Every class folder of {src} is excluded; exclude fewer classes.")
    return kept


def _files(src: Path, name: str) -> list[str]:
    """Image files of class ``name``, relative to its folder, with ``/``."""
    folder = src / name
    return [Path(p).relative_to(folder).as_posix() for p in scan_images(folder)]


def _check_enough(files: dict[str, list[str]], train: int, test: int) -> None:
    need = train + test
    short = [(name, len(paths)) for name, paths in files.items() if len(paths) < need]
    if not short:
        return
    shown = ", ".join(f"{name} ({n})" for name, n in short[:_SHOWN])
    more = f" and {len(short) - _SHOWN} more" if len(short) > _SHOWN else ""
    raise SettingError(
        f"{len(short)} class(es) have fewer than {need} images (train {train} + test {test}): "
        f"{literal(shown)}{more}; lower {{train_per_class}} / {{test_per_class}} or {{exclude}} "
        "them."
    )


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
def _place(source: Path, target: Path, link: Link) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        if link == "symlink":
            target.symlink_to(source)
        elif link == "hardlink":
            os.link(source, target)
        else:
            shutil.copy2(source, target)
    except OSError as exc:
        if link == "hardlink" and exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise SettingError(
                f"Cannot hard-link {literal(source)} into {literal(target.parent)} "
                f"({literal(exc.strerror)}); hard links need the same file system: use {{link}} "
                "symlink or {link} copy."
            ) from exc
        raise OSError(
            exc.errno, f"Could not {link} {source} to {target} ({exc.strerror or exc})"
        ) from exc


def _write(
    folder: Path,
    src: Path,
    chosen: dict[str, tuple[str, ...]],
    link: Link,
    manifest: dict[str, Any],
) -> None:
    for split, paths in chosen.items():
        for rel in paths:
            _place(src / rel, folder / split / rel, link)
    text = json.dumps(manifest, indent=2) + "\n"
    with open(folder / MANIFEST, "w", encoding="utf-8") as f:  # last: its presence = complete
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def split_per_class(
    src: str | Path,
    dst: str | Path,
    *,
    train_per_class: int,
    test_per_class: int,
    seed: int = 0,
    exclude: Iterable[str] = (),
    link: Link = "symlink",
) -> SplitResult:
    """Write a seeded split of ``src/<class>/**`` with fixed image counts per class into ``dst``.

    Every class gets ``test_per_class`` test and ``train_per_class`` other training images,
    chosen as the module docstring says; images beyond that are left out. ``dst`` must not exist
    or be an empty folder; it is created complete or not at all.

    Args:
        src: the folder of class folders; only read.
        dst: the split folder to create, outside ``src``.
        train_per_class: training images per class.
        test_per_class: test images per class.
        seed: the split's seed; the same seed and files give the same split anywhere.
        exclude: class folder names to leave out (Caltech-256: ``["257.clutter"]``).
        link: how ``dst`` holds the images: ``"symlink"`` (absolute links into the resolved
            ``src``), ``"hardlink"`` (same file system only; editing a file in ``dst`` edits
            the one in ``src``) or ``"copy"``.

    Returns:
        The classes and the files of each split.

    Raises:
        FileNotFoundError: ``src`` is missing.
        ValueError: a count below 1, an unknown ``link``, a ``src`` without class folders, an
            ``exclude`` name that is no class folder, a class with fewer than
            ``train_per_class + test_per_class`` images, ``dst`` inside ``src``, ``dst`` not
            empty, or hard links across file systems (a
            :class:`~deltaft.app.errors.SettingError` where a setting is at fault).
        OSError: writing failed (the partial folder is removed; ``dst`` is not created).

    Example:
        >>> split_per_class("256_ObjectCategories", "data/caltech256-30", train_per_class=30,
        ...                 test_per_class=20, exclude=["257.clutter"])  # doctest: +SKIP
    """
    _check_count(train_per_class, "train_per_class", 30)
    _check_count(test_per_class, "test_per_class", 20)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SettingError(f"seed must be an integer, got {literal(repr(seed))}; e.g. {{seed}} 0.")
    if link not in get_args(Link):
        raise ValueError(f"Unknown link {link!r}; choose symlink, hardlink or copy.")
    src_path = Path(src).expanduser()
    dst_path = Path(os.path.abspath(Path(dst).expanduser()))  # "." has no name to put next to
    exclude = sorted(set(exclude))
    _check_src(src_path)
    _check_dst(src_path, dst_path)
    classes = _classes(src_path, exclude)
    files = {name: _files(src_path, name) for name in classes}
    _check_enough(files, train_per_class, test_per_class)

    train: list[str] = []
    test: list[str] = []
    for name, paths in files.items():
        order = [f"{name}/{rel}" for rel in _ordered(name, paths, seed)]
        test += order[:test_per_class]
        train += order[test_per_class : test_per_class + train_per_class]
    chosen = {"train": tuple(sorted(train)), "test": tuple(sorted(test))}
    manifest = {
        "format": _FORMAT,
        "source": str(src_path.resolve()),
        "arguments": {
            "train_per_class": train_per_class,
            "test_per_class": test_per_class,
            "seed": seed,
            "exclude": exclude,
            "link": link,
        },
        "order": "per class: sha256('{seed}\\0{class}\\0{path in class}'); test first, then train",
        "classes": classes,
        "counts": {split: len(paths) for split, paths in chosen.items()},
        "files": {split: list(paths) for split, paths in chosen.items()},
    }

    with atomic_directory(dst_path) as partial:  # dst is empty or absent (checked above)
        _write(partial, src_path.resolve(), chosen, link, manifest)
    unused = sum(len(paths) for paths in files.values()) - len(train) - len(test)
    logger.debug(
        "Split %d classes of %s into %s: train %d, test %d images (%d left out).",
        len(classes),
        src_path,
        dst_path,
        len(train),
        len(test),
        unused,
    )
    return SplitResult(dst_path, tuple(classes), chosen["train"], chosen["test"])
