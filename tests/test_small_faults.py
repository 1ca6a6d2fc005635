"""Issue #12, classes 12 and 14: small faults of files and folders.

Each test reproduced its defect before the fix: a metrics write error that did not name the
file, files written with mode 0600 whatever the umask, a removed config.yaml not rewritten on
resume, a PNG passed as weights refused as unsafe pickle, an output folder inside the data
folder, and compare writing into a train run's folder.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from deltaft._utils import atomic_write
from deltaft.app.tracking import RunDir
from deltaft.app.weights import read_state_dict
from tests.cli_support import (  # noqa: F401 (autouse fixtures)
    MODEL,
    one_thread,
    restore_logging,
    run_main,
    write_images,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes: 4 train images each, 1 val and 1 test image each."""
    root = tmp_path_factory.mktemp("data")
    for split, n, seed in (("train", 4, 0), ("val", 1, 1), ("test", 1, 2)):
        write_images(root, split, n, seed)
    return root


def _argv(data: Path, out: Path, *extra: str, epochs: int = 1) -> list[str]:
    return [
        "--threads", "1", "train", "--data", str(data), "--model", MODEL, "--weights", "none",
        "--method", "l2", "--out", str(out), "--image-size", "32", "--batch-size", "4",
        "--epochs", str(epochs), "--workers", "0", "--device", "cpu", *extra,
    ]  # fmt: skip


def _errors(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("deltaft: error:")]


# ------------------------------------------------------------------------------------------------
# Class 14: files
# ------------------------------------------------------------------------------------------------
def test_a_failed_metrics_append_names_the_file_and_leaves_no_partial_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix the error said only "No space left on device"."""
    run = RunDir(tmp_path / "run")
    run.append_metrics({"epoch": 1, "loss": 0.5})
    before = run.metrics_path.read_bytes()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="Could not write .*metrics.jsonl .No space left") as info:
        run.append_metrics({"epoch": 2, "loss": 0.25})
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert run.metrics_path.read_bytes() == before
    assert run.read_metrics() == [{"epoch": 1, "loss": 0.5}]


@pytest.fixture
def umask_027() -> Iterator[int]:
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


@pytest.mark.parametrize("existing", [False, True])
def test_atomic_write_gives_the_umask_mode(tmp_path: Path, umask_027: int, existing: bool) -> None:
    """Before the fix every file kept mkstemp's 0600, whatever the user's umask."""
    path = tmp_path / "file.txt"
    if existing:
        path.write_bytes(b"old")
        path.chmod(0o600)
    atomic_write(path, lambda handle: handle.write(b"new"))
    assert path.read_bytes() == b"new"
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask_027


def test_resume_rewrites_a_removed_config_yaml(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before the fix a resumed run never wrote config.yaml: once removed, it stayed missing."""
    out = tmp_path / "run"
    code, _, err = run_main(capsys, *_argv(data, out, epochs=1))
    assert code == 0, err
    config = out / "config.yaml"
    original = config.read_text()
    config.unlink()
    (out / "summary.json").unlink()  # as if stopped after its last checkpoint
    code, _, err = run_main(capsys, *_argv(data, out), "--resume")
    assert code == 0, err
    assert "config.yaml" in err  # said so
    assert config.read_text() == original


def test_a_png_as_weights_is_not_a_weights_file(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before the fix: "refusing to load ...: it is not a plain weights file (weights_only=True)",
    a pickle-safety refusal for a file that is no pickle at all."""
    png = data / "train" / "ant" / "0.png"
    for name in ("weights.pt", "weights.safetensors"):
        weights = tmp_path / name
        weights.write_bytes(png.read_bytes())
        argv = _argv(data, tmp_path / f"run-{name}")
        argv[argv.index("--weights") + 1] = str(weights)
        code, _, err = run_main(capsys, *argv)
        assert code == 2, err
        [line] = _errors(err)
        assert f"{weights} is not a weights file (a PNG image)" in line, line
        assert "pickle" not in line and "weights_only" not in line


def test_weights_files_are_recognised_by_their_first_bytes(tmp_path: Path) -> None:
    state = {"layer.weight": torch.arange(6.0).reshape(2, 3)}
    torch.save(state, tmp_path / "zip.pt")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file(state, str(tmp_path / "tensors.safetensors"))
    for name in ("zip.pt", "legacy.pt", "tensors.safetensors"):
        [(key, value)] = read_state_dict(tmp_path / name).items()
        assert key == "layer.weight" and torch.equal(value, state["layer.weight"])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("model: resnet\n")
    for name in ("empty.pt", "text.pt"):
        with pytest.raises(ValueError, match=f"{name} is not a weights file"):
            read_state_dict(tmp_path / name)


# ------------------------------------------------------------------------------------------------
# Class 12: folders
# ------------------------------------------------------------------------------------------------
def _compare_argv(data: Path, out: Path) -> list[str]:
    return [
        "--threads", "1", "compare", "--data", str(data), "--model", MODEL, "--weights", "none",
        "--out", str(out), "--image-size", "32", "--batch-size", "4", "--epochs", "1",
        "--workers", "0", "--device", "cpu", "--methods", "l2", "--seeds", "1",
    ]  # fmt: skip


@pytest.mark.parametrize("command", ["train", "compare"])
@pytest.mark.parametrize("where", ["inside", "same", "via-symlink"])
def test_an_out_inside_the_data_folder_is_refused(
    command: str, where: str, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before the fix the run wrote into the data folder: its PNG figures became images of a
    class (or a class folder) of the next run's training split."""
    data = Path(shutil.copytree(data, tmp_path / "data"))  # the shared folder stays clean
    before = sorted(data.rglob("*"))
    out = {"inside": data / "runs" / "a", "same": data, "via-symlink": tmp_path / "link" / "a"}
    if where == "via-symlink":
        (tmp_path / "link").symlink_to(data)
    argv = (_argv if command == "train" else _compare_argv)(data, out[where])
    code, stdout, err = run_main(capsys, *argv)
    assert code == 2 and stdout == ""
    [line] = _errors(err)
    assert f"--out {out[where]} is inside --data {data}" in line, line
    assert sorted(data.rglob("*")) == before  # nothing written


def test_compare_into_a_train_run_folder_is_refused(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before the fix compare added its run folders and compare.* files to the train run's."""
    out = tmp_path / "run"
    code, _, err = run_main(capsys, *_argv(data, out))
    assert code == 0, err
    before = sorted(out.rglob("*"))
    code, stdout, err = run_main(capsys, *_compare_argv(data, out))
    assert code == 2 and stdout == ""
    [line] = _errors(err)
    assert f"--out {out} holds a training run" in line, line
    assert sorted(out.rglob("*")) == before


@pytest.mark.slow
def test_a_setting_error_inside_a_compare_job_is_one_line_with_its_flag(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Class 12: an error raised in a ``compare --jobs`` worker process reaches the command line
    as the same one line as in one process: exit 2, the setting written as its flag."""
    missing = tmp_path / "missing.safetensors"
    argv = [*_compare_argv(data, tmp_path / "cmp"), "--jobs", "2", "--attention", str(missing)]
    argv[argv.index("--methods") + 1] = "l2,delta"
    code, _, err = run_main(capsys, *argv)
    assert code == 2
    assert _errors(err) == [f"deltaft: error: --attention {missing}: no such file."]
