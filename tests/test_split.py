"""``split_per_class`` and ``deltaft split`` on generated image folders."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from deltaft.app import split as S
from deltaft.app.data import ImageFolder, build_datasets
from deltaft.app.errors import SettingError
from deltaft.app.split import SplitResult, split_per_class
from deltaft.cli.options import message as cli_message
from tests.cli_support import (  # noqa: F401 (autouse fixtures)
    one_thread,
    raises_rendered,
    restore_logging,
    run_main,
)

COUNTS = {"001.ak47": 7, "002.bat": 6, "003.cake": 8, "257.clutter": 5}


def _png(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (shade, shade, shade)).save(path)


def _source(root: Path, counts: dict[str, int] = COUNTS) -> Path:
    """``root/<class>/<i>.png``, each class its own shade, plus a file that is not an image."""
    for c, (name, n) in enumerate(sorted(counts.items())):
        for i in range(n):
            _png(root / name / f"{i:02d}.png", 40 * c)
    if "001.ak47" in counts:
        (root / "001.ak47" / "notes.txt").write_text("not an image")
    return root


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its mtime (ns) and size, symlinks not followed."""
    out = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        out[path.relative_to(root).as_posix()] = (info.st_mtime_ns, info.st_size)
    return out


def _split(src: Path, dst: Path, **kwargs: object) -> SplitResult:
    args: dict[str, object] = {"train_per_class": 3, "test_per_class": 2, **kwargs}
    return split_per_class(src, dst, **args)  # type: ignore[arg-type]


def _by_class(paths: tuple[str, ...]) -> Counter[str]:
    return Counter(p.split("/")[0] for p in paths)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return _source(tmp_path / "src")


# ------------------------------------------------------------------------------------------------
# What is chosen


def test_counts_per_class_and_disjoint_splits(src: Path, tmp_path: Path) -> None:
    result = _split(src, tmp_path / "dst", exclude=["257.clutter"])
    classes = ["001.ak47", "002.bat", "003.cake"]
    assert result.classes == tuple(classes)
    assert _by_class(result.train) == dict.fromkeys(classes, 3)
    assert _by_class(result.test) == dict.fromkeys(classes, 2)
    assert not set(result.train) & set(result.test)
    assert all(p.endswith(".png") for p in result.train + result.test)  # notes.txt is no image
    for split, paths in (("train", result.train), ("test", result.test)):
        on_disk = sorted(p.relative_to(result.dst / split) for p in (result.dst / split).rglob("*"))
        assert [p.as_posix() for p in on_disk if p.suffix == ".png"] == list(paths)
    assert sorted(p.name for p in result.dst.iterdir()) == ["split.json", "test", "train"]


def _reference_order(seed: int, name: str, files: list[str]) -> list[str]:
    """The documented order: by sha256("{seed}\\0{class}\\0{path in class}")."""
    return sorted(files, key=lambda f: hashlib.sha256(f"{seed}\0{name}\0{f}".encode()).hexdigest())


def test_choice_follows_the_documented_order(src: Path, tmp_path: Path) -> None:
    """Test takes the first 2 of each class's order, train the next 3."""
    result = _split(src, tmp_path / "dst", seed=5)
    for name, n in COUNTS.items():
        order = [
            f"{name}/{f}" for f in _reference_order(5, name, [f"{i:02d}.png" for i in range(n)])
        ]
        assert [p for p in result.test if p.startswith(name + "/")] == sorted(order[:2])
        assert [p for p in result.train if p.startswith(name + "/")] == sorted(order[2:5])


def test_same_seed_same_split_other_seed_other_split(src: Path, tmp_path: Path) -> None:
    one = _split(src, tmp_path / "one", seed=1)
    two = _split(src, tmp_path / "two", seed=1)
    other = _split(src, tmp_path / "other", seed=2)
    assert (one.train, one.test) == (two.train, two.test)
    assert (one.train, one.test) != (other.train, other.test)
    manifest = json.loads(one.manifest.read_text())
    assert manifest["files"] == json.loads(two.manifest.read_text())["files"]


def test_more_training_images_keep_the_test_set_and_extend_train(src: Path, tmp_path: Path) -> None:
    """As 30 vs 60 per class on Caltech-256: same test images, the smaller train set nested."""
    small = _split(src, tmp_path / "small", train_per_class=2, test_per_class=2)
    large = _split(src, tmp_path / "large", train_per_class=3, test_per_class=2)
    assert small.test == large.test
    assert set(small.train) < set(large.train)


def test_exclude_leaves_classes_out(src: Path, tmp_path: Path) -> None:
    result = _split(src, tmp_path / "dst", exclude=["257.clutter", "002.bat"])
    assert result.classes == ("001.ak47", "003.cake")
    assert sorted(p.name for p in (result.dst / "train").iterdir()) == ["001.ak47", "003.cake"]
    assert json.loads(result.manifest.read_text())["arguments"]["exclude"] == [
        "002.bat",
        "257.clutter",
    ]


def test_nested_files_with_the_same_name_do_not_collide(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i, sub in enumerate(("", "a/", "b/", "a/deeper/")):
        _png(src / "cat" / f"{sub}x.png", 10 * i)
        _png(src / "dog" / f"{sub}x.png", 100 + 10 * i)
    result = _split(src, tmp_path / "dst", train_per_class=2, test_per_class=2)
    chosen = result.train + result.test
    assert len(set(chosen)) == 8
    dst_files = sorted(
        p.relative_to(result.dst).as_posix() for p in result.dst.rglob("x.png") if p.is_file()
    )
    assert len(dst_files) == 8
    for split, paths in (("train", result.train), ("test", result.test)):
        for rel in paths:  # DST/<split>/<path> holds SRC/<path>
            assert (result.dst / split / rel).read_bytes() == (src / rel).read_bytes()


# ------------------------------------------------------------------------------------------------
# What is written


@pytest.mark.parametrize("link", ["symlink", "hardlink", "copy"])
def test_each_link_kind_gives_a_loadable_image_folder(
    src: Path, tmp_path: Path, link: S.Link
) -> None:
    result = _split(src, tmp_path / "dst", link=link, exclude=["257.clutter"])
    some = result.dst / "train" / result.train[0]
    original = src / result.train[0]
    if link == "symlink":
        assert some.is_symlink() and os.path.isabs(os.readlink(some))
        assert some.resolve() == original.resolve()
    elif link == "hardlink":
        assert not some.is_symlink() and os.path.samefile(some, original)
    else:
        assert not some.is_symlink() and not os.path.samefile(some, original)
        assert some.read_bytes() == original.read_bytes()

    train = ImageFolder(result.dst / "train")
    assert len(train.classes) == 3 and len(train) == 9
    image, label = train[0]
    assert image.size == (4, 4) and label == 0
    splits = build_datasets(str(result.dst), image_size=8)
    assert splits.num_classes == 3 and splits.test is not None
    assert (len(splits.train), len(splits.test)) == (9, 6)  # type: ignore[arg-type]


def test_manifest_records_arguments_counts_and_files(src: Path, tmp_path: Path) -> None:
    result = _split(src, tmp_path / "dst", seed=3, link="copy", exclude=["257.clutter"])
    manifest = json.loads(result.manifest.read_text())
    assert manifest["arguments"] == {
        "train_per_class": 3,
        "test_per_class": 2,
        "seed": 3,
        "exclude": ["257.clutter"],
        "link": "copy",
    }
    assert manifest["source"] == str(src.resolve())
    assert manifest["classes"] == list(result.classes)
    assert manifest["counts"] == {"train": 9, "test": 6}
    assert manifest["files"] == {"train": list(result.train), "test": list(result.test)}


def test_source_is_untouched(src: Path, tmp_path: Path) -> None:
    before = _snapshot(src)
    for link in ("symlink", "hardlink", "copy"):
        _split(src, tmp_path / link, link=link)
    with pytest.raises(ValueError):
        _split(src, tmp_path / "too-many", train_per_class=50)
    assert _snapshot(src) == before


def test_empty_destination_folder_is_used(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "empty"
    dst.mkdir()
    result = _split(src, dst)
    assert result.manifest.is_file()
    assert not list(tmp_path.glob("*.partial-*"))


def test_failed_write_leaves_no_destination(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    place = S._place

    def failing(source: Path, target: Path, link: S.Link) -> None:
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        place(source, target, link)

    monkeypatch.setattr(S, "_place", failing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OSError, match="No space left"):
        _split(src, tmp_path / "dst")
    with pytest.raises(OSError, match="No space left"):
        calls["n"] = 0
        _split(src, empty)
    assert not (tmp_path / "dst").exists()
    assert empty.is_dir() and not list(empty.iterdir())  # the user's empty folder is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "src"]  # no partial folder


def test_write_error_names_the_file(src: Path, tmp_path: Path) -> None:
    (src / "002.bat" / "99.png").symlink_to(tmp_path / "nowhere.png")  # dangling: cannot copy
    with pytest.raises(OSError, match=r"Could not copy .*99\.png"):
        _split(
            src,
            tmp_path / "dst",
            link="copy",
            train_per_class=4,
            test_per_class=3,
            exclude=["257.clutter"],
        )
    assert not (tmp_path / "dst").exists()


def test_hardlink_across_file_systems_says_what_to_use(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def cross_device(source: object, target: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(S.os, "link", cross_device)
    with raises_rendered(SettingError, "--link symlink or --link copy"):
        _split(src, tmp_path / "dst", link="hardlink")
    assert not (tmp_path / "dst").exists()


# ------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train_per_class": 0}, "--train-per-class must be a positive integer, got 0"),
        ({"test_per_class": -1}, "--test-per-class must be a positive integer, got -1"),
        ({"train_per_class": True}, "--train-per-class must be a positive integer"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"link": "move"}, "Unknown link 'move'; choose symlink, hardlink or copy"),
        ({"exclude": ["257.cluter"]}, "--exclude names no class folder .*: 257.cluter"),
        (
            {"exclude": ["001.ak47", "002.bat", "003.cake", "257.clutter"]},
            "Every class folder .* is excluded",
        ),
    ],
)
def test_argument_errors(src: Path, tmp_path: Path, kwargs: dict[str, object], match: str) -> None:
    with raises_rendered(ValueError, match):
        _split(src, tmp_path / "dst", **kwargs)
    assert not (tmp_path / "dst").exists()


def test_too_few_images_lists_classes_and_says_what_to_do(tmp_path: Path) -> None:
    src = _source(tmp_path / "src", {f"c{i}": i for i in range(1, 9)} | {"full": 9})
    with pytest.raises(ValueError) as info:
        _split(src, tmp_path / "dst", train_per_class=6, test_per_class=3)
    assert isinstance(info.value, SettingError)
    message = cli_message(info.value)  # as the command line prints it
    assert message.startswith("8 class(es) have fewer than 9 images (train 6 + test 3): ")
    assert "c1 (1), c2 (2), c3 (3), c4 (4), c5 (5) and 3 more" in message
    assert "c6" not in message and "full" not in message
    assert "lower --train-per-class / --test-per-class or --exclude them" in message


def test_too_few_images_after_exclude(src: Path, tmp_path: Path) -> None:
    with raises_rendered(ValueError, r"1 class\(es\) .*: 257\.clutter \(5\);"):
        _split(src, tmp_path / "dst", train_per_class=4, test_per_class=2)
    assert _split(
        src, tmp_path / "dst", train_per_class=4, test_per_class=2, exclude=["257.clutter"]
    )


@pytest.mark.parametrize(
    ("layout", "match"),
    [
        ("missing", "Source folder .* does not exist; pass a folder of class folders"),
        ("file", "is not a folder; pass a folder of class folders"),
        ("no_classes", "has no class folders; put the images of each class in"),
    ],
)
def test_source_errors(tmp_path: Path, layout: str, match: str) -> None:
    src = tmp_path / "src"
    if layout == "file":
        src.write_text("not a folder")
    elif layout == "no_classes":
        src.mkdir()
        _png(src / "loose.png", 0)
    with raises_rendered(FileNotFoundError if layout == "missing" else ValueError, match):
        _split(src, tmp_path / "dst")


@pytest.mark.parametrize("where", ["inside", "same", "nested_inside", "through_a_symlink"])
def test_destination_inside_source_is_refused(src: Path, tmp_path: Path, where: str) -> None:
    (tmp_path / "alias").symlink_to(src)
    dst = {
        "inside": src / "split",
        "same": src,
        "nested_inside": src / "001.ak47" / "x",
        "through_a_symlink": tmp_path / "alias" / "split",
    }[where]
    before = _snapshot(src)
    with raises_rendered(ValueError, "is inside the source folder .*pick a folder outside it"):
        _split(src, dst)
    assert _snapshot(src) == before


def test_non_empty_destination_is_refused_and_kept(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    (dst / "train").mkdir(parents=True)
    (dst / "mine.txt").write_text("keep me")
    before = _snapshot(dst)
    with raises_rendered(ValueError, "exists and is not empty; pick another folder"):
        _split(src, dst)
    assert _snapshot(dst) == before and (dst / "mine.txt").read_text() == "keep me"
    done = _split(src, tmp_path / "done")
    with raises_rendered(ValueError, "exists and is not empty"):  # a finished split too
        _split(src, done.dst)


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_destination_that_is_no_folder_is_refused(src: Path, tmp_path: Path, kind: str) -> None:
    dst = tmp_path / "dst"
    if kind == "file":
        dst.write_text("mine")
        match = "exists and is not a folder"
    else:
        (tmp_path / "elsewhere").mkdir()
        dst.symlink_to(tmp_path / "elsewhere")
        match = "is a symbolic link"
    with raises_rendered(ValueError, match):
        _split(src, dst)


# ------------------------------------------------------------------------------------------------
# Command line


def test_cli_splits_and_prints_one_line(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = tmp_path / "data" / "caltech-3"  # parent folders are created
    code, out, err = run_main(
        capsys, "split", str(src), str(dst), "--train-per-class", "3", "--test-per-class", "2",
        "--seed", "4", "--exclude", "257.clutter", "--link", "copy",
    )  # fmt: skip
    assert code == 0, err
    assert out.splitlines() == [
        f"3 classes: 9 train + 6 test images (3 + 2 per class, seed 4, copy) in {dst}; every "
        f"file is listed in {dst / 'split.json'}"
    ]
    manifest = json.loads((dst / "split.json").read_text())
    assert manifest["arguments"]["seed"] == 4 and manifest["arguments"]["link"] == "copy"
    assert manifest["counts"] == {"train": 9, "test": 6}
    assert _split(src, tmp_path / "again", seed=4, exclude=["257.clutter"]).train == tuple(
        manifest["files"]["train"]
    )


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--train-per-class", "10", "--test-per-class", "2"], "have fewer than 12 images"),
        (["--train-per-class", "0", "--test-per-class", "2"], "must be a positive integer"),
        (["--test-per-class", "2"], "the following arguments are required: --train-per-class"),
        (["--train-per-class", "3", "--test-per-class", "2", "--link", "move"], "invalid choice"),
    ],
)
def test_cli_errors_exit_2_with_one_line(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], match: str
) -> None:
    code, out, err = run_main(capsys, "split", str(src), str(tmp_path / "dst"), *extra)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("deltaft: error: ")
    assert re.search(match, err)
    assert not (tmp_path / "dst").exists()
