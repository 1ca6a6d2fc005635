"""The shared helpers of deltaft._utils: a folder is written whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from deltaft._utils import atomic_directory


def test_atomic_directory_renames_a_finished_folder(tmp_path: Path) -> None:
    dst = tmp_path / "out" / "split"
    with atomic_directory(dst) as partial:
        assert partial.parent == dst.parent and partial.name.startswith("split.partial-")
        (partial / "a.txt").write_text("a")
        assert not dst.exists()  # nothing at dst while the folder is being written
    assert (dst / "a.txt").read_text() == "a"
    assert sorted(p.name for p in dst.parent.iterdir()) == ["split"]


def test_atomic_directory_leaves_nothing_on_error(tmp_path: Path) -> None:
    dst = tmp_path / "split"
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(dst) as partial:
        (partial / "a.txt").write_text("a")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_replaces_an_empty_folder_only(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_directory(empty) as partial:
        (partial / "a.txt").write_text("a")
    assert (empty / "a.txt").is_file()

    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("keep")
    with pytest.raises(OSError), atomic_directory(full) as partial:
        (partial / "b.txt").write_text("b")
    assert sorted(p.name for p in full.iterdir()) == ["mine.txt"]  # the user's folder untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "full"]  # no partial left
