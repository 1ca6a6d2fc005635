"""Where the splits come from (image folders, torchvision datasets) and :func:`build_datasets`.

``build_datasets(data)`` accepts three layouts and returns the train, validation and test splits:

* ``DIR/train/<class>/*`` with optional ``DIR/val/<class>/*`` and ``DIR/test/<class>/*``. The class
  folders of ``val/`` and ``test/`` must be the same as those of ``train/``.
* A flat ``DIR/<class>/*``: split once into train and test, 80/20 per class
  (:func:`~deltaft.app.data.sampling.stratified_split` with ``TEST_FRACTION`` and the fixed seed
  ``TEST_SPLIT_SEED``, so every run seed evaluates on the same test images).
* ``tv:NAME``, a torchvision dataset (see ``TV_DATASETS``) under ``data_root``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Any

import torchvision
from torch.utils.data import Dataset

from deltaft.app.data.folders import ImageFolder
from deltaft.app.data.images import one_line
from deltaft.app.data.sampling import (
    check_sampling,
    check_val_split,
    stratified_indices,
    stratified_split,
)
from deltaft.app.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preset,
    eval_transform,
    train_transform,
)
from deltaft.app.errors import SettingError

__all__ = [
    "DEFAULT_DATA_ROOT",
    "FAKEDATA_CLASSES",
    "FAKEDATA_SIZES",
    "TEST_FRACTION",
    "TEST_SPLIT_SEED",
    "TV_DATASETS",
    "DataSplits",
    "build_datasets",
]

logger = logging.getLogger(__name__)

TEST_FRACTION = 0.2  # flat folders and Caltech256: share of each class held out for testing
TEST_SPLIT_SEED = 0  # the test split never depends on the run's seed
DEFAULT_DATA_ROOT = "~/.cache/deltaft/datasets"
FAKEDATA_SIZES: dict[str, int] = {"train": 200, "test": 100}
FAKEDATA_CLASSES = 5
_FAKEDATA_TEST_OFFSET = 1_000_000  # FakeData seeds image i with i + offset: disjoint train/test

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
        raise SettingError(
            f"Data folder {root} does not exist; pass {{data}} DIR with DIR/<class>/<images> or "
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
        raise ValueError(
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
            raise SettingError(
                f"Could not download tv:{name} into {root} ({one_line(exc)}); check the network, "
                "or download it by hand into {data_root} DIR."
            ) from exc
        raise SettingError(
            f"tv:{name} not found under {root} ({one_line(exc)}); pass {{download}} on a machine "
            "with internet, or {data_root} DIR where it was downloaded."
        ) from exc


def _tv_source(name: str, root: Path, download: bool, image_size: int) -> _Source:
    canonical = {k.lower(): k for k in TV_DATASETS}.get(name.lower())
    if canonical is None:
        supported = ", ".join(f"tv:{k}" for k in sorted(TV_DATASETS))
        raise ValueError(f"Unknown torchvision dataset tv:{name}; supported: {supported}.")
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
    pool: tuple[Dataset[Any], list[int]], transform: Callable[[Any], Any], *, evaluated: bool
) -> Dataset[tuple[Any, int]]:
    """The split's dataset; an evaluated image folder raises on an unreadable file (no
    stand-in image with another image's label)."""
    base, indices = pool
    if isinstance(base, ImageFolder):
        return base.subset(indices, transform=transform, skip_unreadable=not evaluated)
    return _TransformedSubset(base, indices, transform)


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

    def verify(self, names: Sequence[str] = ("train", "val", "test")) -> list[str]:
        """Decode every image of the splits ``names`` once, take the unreadable ones out of their
        split (:meth:`ImageFolder.drop_skipped`) and return the sorted paths skipped so far.

        Afterwards those splits hold only images that decoded, and their ``len`` is the count.

        Raises:
            ValueError: every image of a class in a split is unreadable (nothing is dropped).
        """
        folders = {name: getattr(self, name) for name in names}
        checked = {n: f for n, f in folders.items() if isinstance(f, ImageFolder)}
        for folder in checked.values():
            folder.verify()
        for name, folder in checked.items():
            _check_readable_classes(folder, name)
        for folder in checked.values():
            folder.drop_skipped()
        return self.skipped()


def _check_readable_classes(folder: ImageFolder, split: str) -> None:
    """Raises ``ValueError`` when a class of ``folder`` has images but none readable."""
    readable = {label for path, label in folder.samples if path not in folder.skipped}
    empty = sorted(set(folder.targets) - readable)
    if empty:
        folders = ", ".join(str(folder.root / folder.classes[label]) for label in empty)
        raise ValueError(
            f"Class folder(s) {folders} have no readable image in the {split} split (every file "
            "failed to decode); fix or re-save the images, or remove the folder."
        )


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

    Image files are decoded when read. An unreadable training image is replaced by the next
    readable one (with a warning); an unreadable validation or test image raises ``OSError``,
    since a stand-in would be counted as another image. :meth:`DataSplits.verify` decodes
    everything once and takes the unreadable files out of every split.

    Returns:
        The splits; ``val`` and ``test`` are ``None`` when the source has none.

    Raises:
        ValueError: a missing or empty folder, fewer than 2 classes, a class folder without
            images, class folders that differ between splits, an unknown ``tv:`` name, a
            torchvision dataset that is not on disk (without ``download``), or an invalid
            option.
    """
    check_sampling(per_class, fraction)
    check_val_split(val_split)
    train_tf = train_transform(image_size, preset, mean, std, hflip=hflip, crop_scale=crop_scale)
    eval_tf = eval_transform(image_size, preset, mean, std)
    if data.startswith("tv:"):
        root = Path(data_root or DEFAULT_DATA_ROOT).expanduser()
        source = _tv_source(data[3:], root, download, image_size)
    else:
        source = _folder_source(Path(data).expanduser())

    if len(source.classes) < 2:
        raise ValueError(
            f"{source.name} has {len(source.classes)} class ({', '.join(source.classes)}); "
            "fine-tuning a classifier needs at least 2 classes: put each class's images in its "
            "own folder."
        )
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
        train=_view((base, indices), train_tf, evaluated=False),
        val=_view(val, eval_tf, evaluated=True) if val is not None else None,
        test=_view(source.test, eval_tf, evaluated=True) if source.test is not None else None,
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
