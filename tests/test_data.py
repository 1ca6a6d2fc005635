"""Image folders, torchvision datasets, stratified sampling and transforms, on generated files."""

from __future__ import annotations

import logging
import os
import pickle
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from deltaft.app import data as D
from deltaft.app.data import (
    DataSplits,
    ImageFolder,
    build_datasets,
    eval_transform,
    folders,
    sources,
    stratified_indices,
    stratified_split,
    train_transform,
    write_image_folder,
)
from deltaft.app.errors import SettingError

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def _png(path: Path, color: tuple[int, int, int] = (10, 20, 30), size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path


def _folder(root: Path, counts: dict[str, int], size: int = 8) -> Path:
    """``root/<class>/<i>.png`` with ``counts[class]`` images, each class its own color."""
    for c, (name, n) in enumerate(sorted(counts.items())):
        for i in range(n):
            _png(root / name / f"{i:03d}.png", COLORS[c % 3], size)
    return root


def _corrupt(path: Path, payload: bytes = b"not an image at all") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return path


def _paths(dataset: Dataset[Any]) -> list[str]:
    assert isinstance(dataset, ImageFolder)
    return [p for p, _ in dataset.samples]


# ------------------------------------------------------------------------------------------
# ImageFolder


def test_image_folder_scans_sorted_classes_and_filters_files(tmp_path: Path) -> None:
    _folder(tmp_path, {"zebra": 2, "ant": 1})
    _png(tmp_path / "ant" / "nested" / "deep.PNG")  # extension case-insensitive, recursive
    _png(tmp_path / "ant" / ".hidden.png")
    _png(tmp_path / ".hidden_class" / "x.png")
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    (tmp_path / "README.md").write_text("top-level files are ignored")

    folder = ImageFolder(tmp_path)

    assert folder.classes == ["ant", "zebra"]
    assert folder.class_to_idx == {"ant": 0, "zebra": 1}
    assert folder.targets == [0, 0, 1, 1]
    names = [Path(p).name for p in _paths(folder)]
    assert names == ["000.png", "deep.PNG", "000.png", "001.png"]
    image, label = folder[3]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 1


def test_image_folder_survives_symlink_loops(tmp_path: Path) -> None:
    _folder(tmp_path, {"a": 2})
    os.symlink(tmp_path / "a", tmp_path / "a" / "loop")  # a/loop -> a
    os.symlink(tmp_path, tmp_path / "a" / "up")  # a/up -> root (contains a again)
    folder = ImageFolder(tmp_path)
    assert len(folder) == 2


def test_image_folder_applies_transform(tmp_path: Path) -> None:
    _folder(tmp_path, {"a": 1})
    folder = ImageFolder(tmp_path, transform=eval_transform(8))
    image, _ = folder[0]
    assert isinstance(image, torch.Tensor) and image.shape == (3, 8, 8)
    assert folder[-1][1] == 0
    with pytest.raises(IndexError, match="out of range"):
        folder[1]


def _save_mode(path: Path, mode: str) -> None:
    """A 4x4 image of ``mode``; the top-left pixel is transparent where the mode allows it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(path)
    elif mode == "P_transparent":
        image = Image.new("P", (4, 4), 1)
        image.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
        image.putpixel((0, 0), 0)
        image.save(path, transparency=0)
    elif mode in ("RGBA", "LA"):
        image = Image.new(mode, (4, 4), (200, 10, 10, 255) if mode == "RGBA" else (200, 255))
        image.putpixel((0, 0), (0, 0, 0, 0) if mode == "RGBA" else (0, 0))
        image.save(path)
    elif mode == "CMYK":
        Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(path)  # red
    else:
        Image.new(mode, (4, 4), 1).save(path)


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [
        ("L", ".png"),
        ("1", ".png"),
        ("P", ".png"),
        ("P_transparent", ".png"),
        ("RGBA", ".png"),
        ("LA", ".png"),
        ("CMYK", ".tiff"),
        ("I;16", ".png"),
        ("RGB", ".gif"),
    ],
)
def test_any_mode_loads_as_rgb(tmp_path: Path, mode: str, suffix: str) -> None:
    _save_mode(tmp_path / "c" / f"img{suffix}", mode)
    image, _ = ImageFolder(tmp_path)[0]
    assert image.mode == "RGB" and image.size == (4, 4)
    pixels = np.asarray(image)
    if mode in ("RGBA", "LA", "P_transparent"):
        assert tuple(pixels[0, 0]) == (255, 255, 255)  # transparent -> white
        assert tuple(pixels[1, 1]) != (255, 255, 255)
    if mode == "I;16":
        assert tuple(pixels[0, 0]) == (255, 255, 255)  # 65535 -> 255, not clipped noise
    if mode == "CMYK":
        assert pixels[0, 0, 0] > 200 and pixels[0, 0, 1] < 50


def test_unreadable_file_is_skipped_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _folder(tmp_path, {"a": 2, "b": 1})
    bad = _corrupt(tmp_path / "a" / "001.png")
    good_png = (tmp_path / "b" / "000.png").read_bytes()
    truncated = _corrupt(tmp_path / "b" / "001.png", good_png[: len(good_png) // 2])
    folder = ImageFolder(tmp_path)
    assert len(folder) == 4  # nothing is decoded at init

    with caplog.at_level(logging.WARNING, logger="deltaft.app.data"):
        first = [folder[i][1] for i in range(len(folder))]
        second = [folder[i][1] for i in range(len(folder))]

    # index 1 (bad) -> next readable is index 2 (class b); index 3 (truncated) wraps to index 0
    assert first == second == [0, 1, 1, 0]
    assert folder.skipped == {str(bad), str(truncated)}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert str(bad) in warnings[0].getMessage()


def test_all_unreadable_raises(tmp_path: Path) -> None:
    _corrupt(tmp_path / "a" / "x.png")
    _corrupt(tmp_path / "b" / "y.jpg")
    folder = ImageFolder(tmp_path)
    with pytest.raises(ValueError, match="None of the 2 images"):
        folder[0]


def test_verify_finds_every_unreadable_file(tmp_path: Path) -> None:
    _folder(tmp_path, {"a": 2})
    bad = _corrupt(tmp_path / "a" / "zz.png")
    folder = ImageFolder(tmp_path)
    assert folder.verify() == [str(bad)]


def test_subset_skips_within_the_subset(tmp_path: Path) -> None:
    _folder(tmp_path, {"a": 3})
    bad = _corrupt(tmp_path / "a" / "001.png")
    folder = ImageFolder(tmp_path)
    sub = folder.subset([1, 2])
    image, _ = sub[0]  # 001.png is bad -> the next sample of the subset, 002.png
    assert isinstance(image, Image.Image)
    assert sub.skipped == {str(bad)} and folder.skipped == set()


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        ("missing", "does not exist"),
        ("file", "is not a folder"),
        ("empty", "has no class folders"),
        ("no_images", "has no image files"),
    ],
)
def test_image_folder_errors(tmp_path: Path, setup: str, match: str) -> None:
    root = tmp_path / "data"
    if setup == "file":
        root.write_text("x")
    elif setup == "empty":
        root.mkdir()
    elif setup == "no_images":
        _folder(root, {"a": 1})
        (root / "b").mkdir()
        (root / "b" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=match):
        ImageFolder(root)


def test_image_folder_class_mismatch(tmp_path: Path) -> None:
    _folder(tmp_path, {"a": 1, "c": 1})
    with pytest.raises(ValueError, match=r"missing: b; unexpected: c"):
        ImageFolder(tmp_path, classes=["a", "b"])


def test_cannot_list_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _folder(tmp_path, {"a": 1})

    def denied(path: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(folders.os, "scandir", denied)
    with pytest.raises(ValueError, match="Cannot list"):
        folders.scan_images(tmp_path / "a")


# ------------------------------------------------------------------------------------------
# Stratified sampling


def test_stratified_indices_per_class_is_nested_and_seeded() -> None:
    targets = [i % 3 for i in range(60)]  # 20 per class
    small = stratified_indices(targets, per_class=5, seed=1)
    large = stratified_indices(targets, per_class=10, seed=1)
    assert Counter(targets[i] for i in small) == {0: 5, 1: 5, 2: 5}
    assert set(small) <= set(large)
    assert small == sorted(small) == stratified_indices(targets, per_class=5, seed=1)
    assert small != stratified_indices(targets, per_class=5, seed=2)
    assert stratified_indices(targets) == list(range(60))


def test_stratified_indices_fraction_keeps_at_least_one() -> None:
    targets = [0] * 10 + [1] * 2
    kept = stratified_indices(targets, fraction=0.15, seed=0)
    assert Counter(targets[i] for i in kept) == {0: 2, 1: 1}  # round(1.5) = 2, max(1, 0.3) = 1
    assert len(stratified_indices(targets, fraction=1.0)) == 12


def test_stratified_indices_short_class_warns(caplog: pytest.LogCaptureFixture) -> None:
    targets = [0] * 5 + [1] * 2
    with caplog.at_level(logging.WARNING, logger="deltaft.app.data"):
        kept = stratified_indices(targets, per_class=3, seed=0)
    assert Counter(targets[i] for i in kept) == {0: 3, 1: 2}
    assert "1 of 2 classes have fewer images" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"per_class": 0}, "^per_class must be >= 1, got 0"),
        ({"per_class": 2.5}, "^per_class must be an integer, got 2.5"),
        ({"per_class": True}, "^per_class must be an integer, got True"),
        ({"fraction": 0.0}, r"^fraction must be in \(0, 1\], got 0.0"),
        ({"fraction": 1.5}, r"^fraction must be in \(0, 1\], got 1.5"),
        ({"per_class": 2, "fraction": 0.5}, "^Give either per_class or fraction, not both"),
    ],
)
def test_stratified_indices_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(SettingError, match=match):
        stratified_indices([0, 1], **kwargs)


def test_stratified_split_holds_out_each_class() -> None:
    targets = [0] * 10 + [1] * 2 + [2]
    rest, held = stratified_split(targets, 0.2, seed=3)
    assert sorted(rest + held) == list(range(13)) and not set(rest) & set(held)
    assert Counter(targets[i] for i in held) == {0: 2, 1: 1}  # the singleton class stays in rest
    assert (rest, held) == stratified_split(targets, 0.2, seed=3)
    assert held != stratified_split(targets, 0.2, seed=4)[1]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_stratified_split_fraction_error(fraction: float) -> None:
    with pytest.raises(ValueError, match=r"held-out fraction must be in \(0, 1\)"):
        stratified_split([0, 0, 1, 1], fraction, seed=0)


# ------------------------------------------------------------------------------------------
# Transforms


@pytest.mark.parametrize("preset", ["default", "paper"])
def test_transforms_output_shape_and_grayscale(preset: D.Preset) -> None:
    gray = Image.new("L", (40, 30), 128)
    for make in (train_transform, eval_transform):
        out = make(16, preset)(gray)
        assert out.shape == (3, 16, 16) and out.dtype == torch.float32


def test_paper_eval_transform_matches_reference_protocol() -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), np.uint8))
    ours = eval_transform(224, "paper", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(image)
    T = torchvision.transforms
    reference = T.Compose(
        [T.Resize((256, 256)), T.CenterCrop(224), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)]
    )(image)
    torch.testing.assert_close(ours, reference)
    steps = [type(s).__name__ for s in train_transform(224, "paper").transforms]
    assert steps[:4] == ["ToRGB", "Resize", "RandomCrop", "RandomHorizontalFlip"]
    assert train_transform(224, "paper").transforms[1].size == (256, 256)
    assert eval_transform(224).transforms[1].size == 256  # default: short side 224 / 0.875


def test_hflip_probability_and_crop_scale() -> None:
    # Left half white, right half black; crop_scale 1 on a square image keeps the whole image
    # (no crop of full area has another aspect ratio), so only the flip can change it.
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[:, :16] = 255
    image = Image.fromarray(pixels)
    unit = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    for hflip, left_is_white in ((0.0, True), (1.0, False)):
        tf = train_transform(16, hflip=hflip, crop_scale=1.0, **unit)
        for _ in range(5):
            out = tf(image)
            assert (out[:, :, :8].mean() > 0.9) == left_is_white
            assert (out[:, :, 8:].mean() > 0.9) != left_is_white
    steps = train_transform(16, hflip=0.0).transforms
    assert "RandomHorizontalFlip" not in [type(s).__name__ for s in steps]
    assert steps[1].scale == (0.25, 1.0)  # the default crop
    assert train_transform(16, crop_scale=0.5).transforms[1].scale == (0.5, 1.0)
    assert train_transform(16, hflip=0.3).transforms[2].p == 0.3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hflip": -0.1}, r"^hflip must be in \[0, 1\], got -0.1"),
        ({"crop_scale": 1.5}, r"^crop_scale must be in \(0, 1\], got 1.5"),
        ({"crop_scale": 0.5, "preset": "paper"}, "Drop crop_scale or use preset default"),
        ({"image_size": 0}, "^image_size must be >= 8, got 0"),
        ({"image_size": 7}, "^image_size must be >= 8, got 7"),
        ({"image_size": 8.0}, "^image_size must be an integer, got 8.0"),
        ({"preset": "fancy"}, "Unknown preset 'fancy'"),
        ({"mean": (0.5, 0.5)}, "mean and std need 3 values"),
        ({"std": (0.5, 0.0, 0.5)}, "mean and std need 3 values"),
    ],
)
def test_transform_errors(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"image_size": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        train_transform(**args)


# ------------------------------------------------------------------------------------------
# build_datasets on folders


def test_split_folders(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _folder(tmp_path / "train", {"a": 4, "b": 4})
    _folder(tmp_path / "val", {"a": 1, "b": 1})
    _folder(tmp_path / "test", {"a": 2, "b": 2})
    with caplog.at_level(logging.WARNING, logger="deltaft.app.data"):
        splits = build_datasets(str(tmp_path), image_size=8, val_split=0.5)
    assert "val_split=0.5 ignored" in caplog.text
    assert splits.classes == ["a", "b"] and splits.num_classes == 2
    assert splits.val is not None and splits.test is not None
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 2, 4)  # type: ignore[arg-type]
    image, label = splits.train[0]
    assert image.shape == (3, 8, 8) and label == 0
    assert len(splits.folders) == 3


def test_split_folders_without_val_or_test(tmp_path: Path) -> None:
    _folder(tmp_path / "train", {"a": 2, "b": 2})
    splits = build_datasets(str(tmp_path), image_size=8)
    assert splits.val is None and splits.test is None


def test_flat_folder_is_split_80_20_independent_of_seed(tmp_path: Path) -> None:
    _folder(tmp_path, {"a": 10, "b": 5})
    one = build_datasets(str(tmp_path), image_size=8, seed=0)
    two = build_datasets(str(tmp_path), image_size=8, seed=7)
    assert one.test is not None and two.test is not None
    train, test = _paths(one.train), _paths(one.test)
    assert not set(train) & set(test) and len(train) + len(test) == 15
    assert Counter(Path(p).parent.name for p in test) == {"a": 2, "b": 1}
    assert test == _paths(two.test)  # the test split never depends on the run seed


def test_subsampling_then_validation_split(tmp_path: Path) -> None:
    _folder(tmp_path / "train", {"a": 10, "b": 10, "c": 3})
    splits = build_datasets(str(tmp_path), image_size=8, per_class=5, val_split=0.2, seed=1)
    assert splits.val is not None
    train, val = _paths(splits.train), _paths(splits.val)
    assert not set(train) & set(val)
    assert Counter(Path(p).parent.name for p in train + val) == {"a": 5, "b": 5, "c": 3}
    assert Counter(Path(p).parent.name for p in val) == {"a": 1, "b": 1, "c": 1}
    # validation images use the deterministic evaluation transform
    torch.testing.assert_close(splits.val[0][0], splits.val[0][0])
    again = build_datasets(str(tmp_path), image_size=8, per_class=5, val_split=0.2, seed=1)
    assert _paths(again.train) == train
    frac = build_datasets(str(tmp_path), image_size=8, fraction=0.5, seed=1)
    assert Counter(Path(p).parent.name for p in _paths(frac.train)) == {"a": 5, "b": 5, "c": 2}


@pytest.mark.parametrize(
    ("layout", "kwargs", "match"),
    [
        ("missing", {}, "does not exist"),
        ("test_only", {}, "no train/ folder"),
        ("mismatch", {}, "differ from the training classes"),
        ("ok", {"val_split": 1.0}, r"val_split must be in \[0, 1\), got 1.0"),
        ("ok", {"val_split": -0.1}, r"val_split must be in \[0, 1\), got -0.1"),
        ("ok", {"per_class": 2, "fraction": 0.5}, "not both"),
    ],
)
def test_build_datasets_errors(
    tmp_path: Path, layout: str, kwargs: dict[str, Any], match: str
) -> None:
    root = tmp_path / "data"
    if layout == "test_only":
        _folder(root / "test", {"a": 1})
    elif layout == "mismatch":
        _folder(root / "train", {"a": 1, "b": 1})
        _folder(root / "test", {"a": 1})
    elif layout == "ok":
        _folder(root, {"a": 2})
    with pytest.raises(ValueError, match=match):
        build_datasets(str(root), image_size=8, **kwargs)


def test_skipped_files_are_collected(tmp_path: Path) -> None:
    _folder(tmp_path / "train", {"a": 2, "b": 2})
    _folder(tmp_path / "test", {"a": 2, "b": 2})
    bad = _corrupt(tmp_path / "train" / "a" / "zz.png")  # training skips; evaluation raises
    splits = build_datasets(str(tmp_path), image_size=8)
    assert splits.skipped() == []
    _ = [splits.train[i] for i in range(len(splits.train))]  # type: ignore[arg-type]
    assert splits.skipped() == [str(bad)]
    assert splits.verify() == [str(bad)]


def test_datasets_pickle_and_load_in_worker_processes(tmp_path: Path) -> None:
    _folder(tmp_path / "train", {"a": 2, "b": 2})
    splits = build_datasets(str(tmp_path), image_size=8, preset="paper")
    clone = pickle.loads(pickle.dumps(splits.train))
    assert len(clone) == 4
    loader = DataLoader(splits.train, batch_size=4, num_workers=1)
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 8, 8) and labels.tolist() == [0, 0, 1, 1]


# ------------------------------------------------------------------------------------------
# torchvision datasets


def test_tv_fakedata(tmp_path: Path) -> None:
    splits = build_datasets("tv:FakeData", image_size=8, data_root=str(tmp_path))
    assert splits.classes == [str(i) for i in range(D.FAKEDATA_CLASSES)]
    assert splits.test is not None and splits.val is None
    assert len(splits.train) == D.FAKEDATA_SIZES["train"]  # type: ignore[arg-type]
    assert len(splits.test) == D.FAKEDATA_SIZES["test"]  # type: ignore[arg-type]
    image, label = splits.train[0]
    assert image.shape == (3, 8, 8) and 0 <= label < D.FAKEDATA_CLASSES
    torch.testing.assert_close(splits.test[3][0], splits.test[3][0])  # seeded images


def test_tv_fakedata_sampling(tmp_path: Path) -> None:
    splits = build_datasets("tv:fakedata", image_size=8, per_class=10, val_split=0.2, seed=2)
    assert splits.val is not None
    labels = [splits.train[i][1] for i in range(len(splits.train))]  # type: ignore[arg-type]
    val_labels = [splits.val[i][1] for i in range(len(splits.val))]  # type: ignore[arg-type]
    assert Counter(labels) == dict.fromkeys(range(5), 8)
    assert Counter(val_labels) == dict.fromkeys(range(5), 2)


class _FakeCaltech(Dataset[tuple[Image.Image, int]]):
    """Stands in for torchvision's Caltech256: no split argument, labels in ``y``."""

    def __init__(self, root: str, download: bool = False) -> None:
        self.y = [i % 3 for i in range(30)]
        self.categories = ["001.ak47", "002.bat", "003.cat"]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.new("L", (6, 6), index), self.y[index]


def test_tv_dataset_without_split_is_held_out_like_a_flat_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torchvision.datasets, "Caltech256", _FakeCaltech)
    splits = build_datasets("tv:Caltech256", image_size=8, data_root=str(tmp_path))
    assert splits.classes == ["001.ak47", "002.bat", "003.cat"]
    assert splits.test is not None
    assert (len(splits.train), len(splits.test)) == (24, 6)  # type: ignore[arg-type]
    image, _ = splits.test[0]
    assert image.shape == (3, 8, 8)  # grayscale converted to RGB


def test_tv_unknown_name() -> None:
    with pytest.raises(ValueError, match="supported: tv:CIFAR10, tv:CIFAR100, tv:Caltech256"):
        build_datasets("tv:ImageNet22k")


def test_tv_missing_without_download(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found under .* pass download on a machine"):
        build_datasets("tv:CIFAR10", data_root=str(tmp_path))


def test_tv_download_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(self: Any) -> None:
        raise URLError("no network")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    with pytest.raises(ValueError, match="Could not download tv:CIFAR10 .*no network"):
        build_datasets("tv:CIFAR10", data_root=str(tmp_path), download=True)


class _Labelled(Dataset[tuple[int, int]]):
    """Two samples; labels in ``_labels`` (as most torchvision datasets keep them)."""

    def __init__(self, labels: list[int] | None = None) -> None:
        self._labels = labels

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> tuple[int, int]:
        return 0, 2 - index


def test_targets_from_attributes_or_by_iteration() -> None:
    assert sources._targets_of(_Labelled([1, 0])) == [1, 0]
    paired = _Labelled([5])  # wrong length: ignored
    paired._samples = [("x", 1), ("y", 1)]  # type: ignore[attr-defined]  # StanfordCars style
    assert sources._targets_of(paired) == [1, 1]
    assert sources._targets_of(_Labelled()) == [2, 1]  # no attribute: read every sample
    assert sources._classes_of(_Labelled(), lambda: [0, 2]) == ["0", "1", "2"]


# ------------------------------------------------------------------------------------------
# write_image_folder


def test_write_image_folder_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images: list[tuple[Image.Image | np.ndarray, int]] = [
        (rng.integers(0, 255, (6, 6), dtype=np.uint8), 0),  # L
        (rng.random((6, 6, 3)), 1),  # float in [0, 1]
        (rng.integers(0, 255, (6, 6, 1)).astype(np.int64), 0),  # int, one channel
        (np.ones((6, 6, 4), dtype=bool), 1),  # RGBA booleans
        (Image.new("RGB", (6, 6), (1, 2, 3)), 1),
    ]
    out = write_image_folder(tmp_path, images, ["zero", "one", "empty"], split="test")
    assert out == tmp_path / "test"
    assert sorted(p.name for p in (out / "one").iterdir()) == [
        "00001.png",
        "00003.png",
        "00004.png",
    ]
    assert (out / "empty").is_dir()
    np.testing.assert_array_equal(np.asarray(Image.open(out / "zero" / "00000.png")), images[0][0])
    (out / "empty" / "x.png").write_bytes((out / "one" / "00004.png").read_bytes())
    loaded = ImageFolder(out)
    assert loaded.classes == ["empty", "one", "zero"] and len(loaded) == 6
    assert np.asarray(loaded[len(loaded) - 1][0]).shape == (6, 6, 3)


@pytest.mark.parametrize(
    ("images", "classes", "match"),
    [
        ([(np.zeros((4, 4)), 2)], ["a", "b"], r"Label 2 of image 0 is outside 0\.\.1"),
        ([(np.zeros(784), 0)], ["a"], r"got \(784,\); reshape"),
        ([(np.zeros((3, 5, 5)), 0)], ["a"], r"got \(3, 5, 5\)"),
        ([], ["a/b"], "cannot be a folder name"),
        ([], [".hidden"], "cannot be a folder name"),
    ],
)
def test_write_image_folder_errors(
    tmp_path: Path, images: list[tuple[np.ndarray, int]], classes: list[str], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        write_image_folder(tmp_path, images, classes)


def test_datasplits_defaults() -> None:
    splits = DataSplits(train=_FakeCaltech(""), val=None, test=None, classes=["a"])
    assert splits.skipped() == [] and splits.folders == []
