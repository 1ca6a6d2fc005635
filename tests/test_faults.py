"""Faults, bad input and untrusted files (issue 5): nothing lost, nothing trusted blindly.

* kill and resume: ``deltaft train`` runs in a subprocess (its own process group, one
  DataLoader worker) that is SIGKILLed or SIGINTed at seeded points, mid-checkpoint-write
  included, then resumed; weights and metrics must equal those of an uninterrupted run;
* numerical faults: a NaN/inf loss part stops the run and keeps the last good checkpoint; a
  dominating regularizer is reported;
* bad data: every kind of broken or odd image file is converted, or skipped with a warning and
  counted in ``summary.json``, never a crash or a hang;
* untrusted files: pickles that would run code, YAML tags, and files of another model are
  refused with one line and exit status 2;
* disk full and read-only output: the previous checkpoint stays intact;
* distributed: when one of two workers dies or hangs, the other exits within a bounded time.

Everything runs on CPU with the toy CNN of ``tests/toy_models.py`` and one torch thread.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from deltaft import _utils
from deltaft.app import tracking
from deltaft.app.data import ImageFolder
from deltaft.objective import TransferObjective
from tests.cli_support import (  # noqa: F401 (autouse fixtures)
    CLASSES,
    MODEL,
    TIMING_KEYS,
    load_state,
    one_thread,
    restore_logging,
    run_main,
    write_images,
)

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, STEPS = 3, 8  # 32 training images, batches of 4
SUBPROCESS_TIMEOUT_S = 240  # a stuck child is killed (and the test fails) after this long


class _Hang(BaseException):
    """Raised by :func:`_deadline`; not an ``Exception``, so no ``except Exception`` hides it."""


@contextlib.contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging for ever) when the block takes longer than ``seconds``."""

    def expire(signum: int, frame: FrameType | None) -> None:
        raise _Hang(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------------------------
# Data, runs and comparisons
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes: 8 train (8 steps of 4 per epoch), 2 val and 2 test images each."""
    root = tmp_path_factory.mktemp("data")
    for split, n, seed in (("train", 8, 0), ("val", 2, 1), ("test", 2, 2)):
        write_images(root, split, n, seed)
    return root


def _train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    """DELTA for 3 epochs with one DataLoader worker process, progress on every step."""
    return [
        "--threads", "1", "train", "--data", str(data), "--model", MODEL, "--weights", "none",
        "--method", "delta", "--out", str(out), "--image-size", "32", "--batch-size", "4",
        "--epochs", str(EPOCHS), "--attention-epochs", "1", "--attention-batches", "2",
        "--workers", "1", "--device", "cpu", "--log-every", "1", *extra,
    ]  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every resumed run must equal (a subprocess, as the faulty ones)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = subprocess.run(
        [sys.executable, "-m", "deltaft", *_train_argv(data, out)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _metrics(run: Path) -> list[dict[str, Any]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


def _assert_same_run(run: Path, reference: Path) -> None:
    """Equal metrics (timings aside), summary numbers and weights of last.pt and best.pt."""
    assert _metrics(run) == _metrics(reference)
    summaries = [json.loads((r / "summary.json").read_text()) for r in (run, reference)]
    for key in ("val_accuracy", "val_loss", "test_accuracy", "test_loss", "best_epoch", "steps"):
        assert summaries[0][key] == summaries[1][key], key
    for name in ("last", "best"):
        got, want = (load_state(r / "checkpoints" / f"{name}.pt") for r in (run, reference))
        assert got["epoch"] == want["epoch"] and "partial" not in got
        assert got["model"].keys() == want["model"].keys()
        for key, value in want["model"].items():
            assert torch.equal(got["model"][key], value), f"{name}.pt {key}"
    assert not list(run.rglob("*.tmp")), "a stale temporary file was left behind"


def _error_lines(err: str) -> list[str]:
    """The stderr lines that are not log lines, progress or warnings."""
    return [line for line in err.splitlines() if line.startswith("deltaft: error:")]


# ------------------------------------------------------------------------------------------------
# Kill and resume (subprocesses)
# ------------------------------------------------------------------------------------------------
# Runs `deltaft` with torch.save / os.replace instrumented to kill the whole process group (a
# power cut, an OOM kill) in the middle of writing a checkpoint: "save-half:N" writes half of the
# N-th checkpoint's bytes (best.pt or last.pt) to its temporary file, "replace:N" has written the
# N-th last.pt completely but not yet renamed it over the old one.
_KILLED_WRITER = """
import io, os, signal, sys
import torch
how, at = os.environ["DELTAFT_TEST_KILL"].split(":")
calls = {"save": 0, "replace": 0}
real_save, real_replace = torch.save, os.replace

def power_cut():
    os.killpg(os.getpgid(0), signal.SIGKILL)

def save(obj, f, *args, **kwargs):
    calls["save"] += 1
    if how == "save-half" and calls["save"] == int(at):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
        power_cut()
    return real_save(obj, f, *args, **kwargs)

def replace(src, dst, **kwargs):
    if os.path.basename(dst) == "last.pt":
        calls["replace"] += 1
        if how == "replace" and calls["replace"] == int(at):
            power_cut()
    return real_replace(src, dst, **kwargs)

torch.save, os.replace = save, replace
from deltaft.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run_child(
    argv: list[str], *, at_line: str | None = None, sig: int = signal.SIGKILL, kill: str = ""
) -> tuple[int, str]:
    """Run ``deltaft argv`` in a new process group; send ``sig`` to the group when a stderr line
    starts with ``at_line``. Returns the exit status and stderr."""
    if kill:
        command = [sys.executable, "-c", _KILLED_WRITER, *argv]
    else:
        command = [sys.executable, "-m", "deltaft", *argv]
    proc = subprocess.Popen(
        command, cwd=ROOT, env=_env(DELTAFT_TEST_KILL=kill), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip

    def signal_group(number: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, number)

    watchdog = threading.Timer(SUBPROCESS_TIMEOUT_S, signal_group, (signal.SIGKILL,))
    watchdog.start()
    lines = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if at_line is not None and line.startswith(at_line):
                signal_group(sig)  # like Ctrl-C in a terminal: the DataLoader worker gets it too
                at_line = None
        code = proc.wait()
    finally:
        watchdog.cancel()
        signal_group(signal.SIGKILL)  # no orphaned DataLoader worker
    return code, "".join(lines)


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_equals_the_uninterrupted_run(
    data: Path, reference: Path, tmp_path: Path
) -> None:
    rng = random.Random(5)
    out = tmp_path / "run"
    argv = _train_argv(data, out)
    resume = [*argv, "--resume"]
    # Epoch 1 writes best.pt then last.pt: die half-way through one of them (before any
    # last.pt exists, or with only best.pt written).
    first = rng.randint(1, 2)
    code, err = _run_child(argv, kill=f"save-half:{first}")
    assert code == -signal.SIGKILL, err[-2000:]
    half_written = list((out / "checkpoints").glob(".*.pt.*.tmp"))
    assert half_written, "the kill was not mid-write"
    assert not (out / "checkpoints" / "last.pt").exists()

    # The resumed run dies at a seeded step of epoch 2 (a little later: the signal races it).
    step = rng.randint(1, STEPS)
    code, err = _run_child(resume, at_line=f"epoch 2/{EPOCHS} step {step}/{STEPS} ")
    assert code == -signal.SIGKILL, err[-2000:]
    assert "Resuming" not in err  # no last.pt yet: the run started again from epoch 1
    assert not any(path.exists() for path in half_written)  # removed on resume
    assert load_state(out / "checkpoints" / "last.pt")["epoch"] >= 1

    # Die after writing a later last.pt completely, just before renaming it over the old one.
    done = load_state(out / "checkpoints" / "last.pt")["epoch"]
    code, err = _run_child(resume, kill="replace:1")
    assert code == -signal.SIGKILL, err[-2000:]
    assert f"after epoch {done} of {EPOCHS}" in err
    assert load_state(out / "checkpoints" / "last.pt")["epoch"] == done  # the old one, intact
    assert list((out / "checkpoints").glob(".last.pt.*.tmp"))

    code, err = _run_child(resume)
    assert code == 0, err[-3000:]
    _assert_same_run(out, reference)


_INTERRUPTED = re.compile(
    r"^deltaft: error: Interrupted (at epoch (\d+), step (\d+)/\d+|after epoch (\d+)); "
    r"(saved|.* holds it; continue it with: deltaft train --out .* --resume)"
)


@pytest.mark.slow
def test_ctrl_c_saves_where_it_stopped_and_resumes_to_the_same_result(
    data: Path, reference: Path, tmp_path: Path
) -> None:
    rng = random.Random(7)
    out = tmp_path / "run"
    argv = _train_argv(data, out)
    mid_epoch = 0
    # Ctrl-C in epoch 1, before any checkpoint exists, then again in the resumed epoch 2.
    for epoch, command in ((1, argv), (2, [*argv, "--resume"])):
        step = rng.randint(1, STEPS - 2)
        line = f"epoch {epoch}/{EPOCHS} step {step}/{STEPS} "
        code, err = _run_child(command, at_line=line, sig=signal.SIGINT)
        assert code == 130, err[-2000:]
        last = err.strip().splitlines()[-1]
        match = _INTERRUPTED.match(last)
        assert match, last
        assert last.endswith(f"continue it with: deltaft train --out {out} --resume")
        assert "Traceback" not in err
        state = load_state(out / "checkpoints" / "last.pt")
        if match.group(2):  # stopped mid-epoch: the epoch's progress is in last.pt
            stopped_at = (int(match.group(2)), int(match.group(3)))
            partial = state["partial"]
            assert (partial["epoch"], partial["step"]) == stopped_at
            assert stopped_at >= (epoch, step)  # the signal lands at or after the line
            assert state["epoch"] == partial["epoch"] - 1
            mid_epoch += 1
        else:  # Ctrl-C after an epoch's last step: last.pt is that epoch's
            assert "partial" not in state and state["epoch"] == int(match.group(4))
        assert not list(out.rglob("*.tmp"))
    assert mid_epoch, "no Ctrl-C landed inside an epoch"
    code, err = _run_child([*argv, "--resume"])
    assert code == 0, err[-3000:]
    assert re.search(r"Resuming .* after epoch \d of 3(, at step \d+ of epoch \d)?\.", err)
    _assert_same_run(out, reference)


def _ctrl_c_at(monkeypatch: pytest.MonkeyPatch, *calls: int, twice: bool = False) -> None:
    """Press Ctrl-C (raise SIGINT) during the given training steps, counted from 1 per run."""
    counter = itertools.count(1)
    original = TransferObjective.forward

    def interrupted(self: TransferObjective, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        if next(counter) in calls:
            signal.raise_signal(signal.SIGINT)
            if twice:
                signal.raise_signal(signal.SIGINT)
        return original(self, x, y)

    monkeypatch.setattr(TransferObjective, "forward", interrupted)


def test_ctrl_c_mid_epoch_and_at_an_epoch_end_resumes_exactly(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process, no DataLoader worker: the same guarantee as the subprocess test above."""
    straight, out = tmp_path / "straight", tmp_path / "run"
    argv = _train_argv(data, out, "--workers", "0")
    code, _, err = run_main(capsys, *_train_argv(data, straight, "--workers", "0"))
    assert code == 0, err

    _ctrl_c_at(monkeypatch, 3)  # epoch 1, step 3
    code, _, err = run_main(capsys, *argv)
    assert code == 130
    assert _error_lines(err) == [
        f"deltaft: error: Interrupted at epoch 1, step 3/{STEPS}; saved {out}/checkpoints/last.pt;"
        f" continue it with: deltaft train --out {out} --resume"
    ]
    state = load_state(out / "checkpoints" / "last.pt")
    assert state["epoch"] == 0 and state["global_step"] == 0
    assert {k: state["partial"][k] for k in ("epoch", "step", "images")} == {
        "epoch": 1,
        "step": 3,
        "images": 12,
    }
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored

    _ctrl_c_at(monkeypatch, STEPS - 3 + STEPS)  # the resumed run: epoch 2's last step
    code, _, err = run_main(capsys, *argv, "--resume")
    assert code == 130
    assert f"Resuming {out} after epoch 0 of {EPOCHS}, at step 3 of epoch 1." in err
    assert _error_lines(err) == [
        f"deltaft: error: Interrupted after epoch 2; {out}/checkpoints/last.pt holds it; "
        f"continue it with: deltaft train --out {out} --resume"
    ]
    assert "partial" not in load_state(out / "checkpoints" / "last.pt")

    monkeypatch.undo()
    code, _, err = run_main(capsys, *argv, "--resume")
    assert code == 0, err
    _assert_same_run(out, straight)


def test_second_ctrl_c_stops_at_once(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first Ctrl-C asks for a stop after the step; a second one during that step wins."""
    _ctrl_c_at(monkeypatch, 3, twice=True)
    out = tmp_path / "run"
    code, _, err = run_main(capsys, *_train_argv(data, out, "--workers", "0", "--method", "l2"))
    assert code == 130
    assert _error_lines(err) == [
        "deltaft: error: Interrupted before the first checkpoint: no training was saved; start "
        f"it again with: deltaft train --out {out} --resume"
    ]
    assert not (out / "checkpoints" / "last.pt").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


# ------------------------------------------------------------------------------------------------
# Numerical faults
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("epoch", "step", "part", "value"),
    [(2, 3, "reg/delta", float("nan")), (1, 2, "task_loss", float("inf"))],
)
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    epoch: int,
    step: int,
    part: str,
    value: float,
    data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = itertools.count(1)
    original = TransferObjective.forward

    def diverging(self: TransferObjective, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        out = original(self, x, y)
        if next(calls) == (epoch - 1) * STEPS + step:
            bad = torch.full_like(out[part], value)
            out = {**out, part: bad, "loss": out["loss"] + bad}
        return out

    monkeypatch.setattr(TransferObjective, "forward", diverging)
    out = tmp_path / "run"
    code, stdout, err = run_main(capsys, *_train_argv(data, out, "--workers", "0"))
    assert code == 1 and stdout == ""
    [line] = _error_lines(err)
    shown = "nan" if value != value else "inf"
    assert line.startswith(
        f"deltaft: error: Non-finite {part} at epoch {epoch}, step {step}/{STEPS} ("
    )
    assert f"{part}={shown}" in line and "training diverged: lower --lr or --alpha" in line
    last = out / "checkpoints" / "last.pt"
    if epoch == 1:
        assert line.endswith("No checkpoint had been written yet.") and not last.exists()
    else:
        assert line.endswith(f"The last good checkpoint, {last} (epoch {epoch - 1}), is kept.")
        state = load_state(last)
        assert state["epoch"] == epoch - 1 and "partial" not in state
        assert all(
            torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()
        )
    assert [row["epoch"] for row in _metrics(out)] == list(range(1, epoch))
    assert not (out / "summary.json").exists()


def test_dominating_regularizer_is_reported(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    warning = "the task loss stopped falling"
    balanced, dominated = tmp_path / "balanced", tmp_path / "dominated"
    for out, alpha in ((balanced, "0.01"), (dominated, "5")):
        argv = _train_argv(data, out, "--workers", "0", "--epochs", "2", "--alpha", alpha)
        code, _, err = run_main(capsys, *argv)
        assert code == 0, err
        rows = _metrics(out)
        ratios = [row["train/reg_to_task"] for row in rows]
        for row, ratio in zip(rows, ratios, strict=True):
            reg = row["train/reg/delta"] + row["train/reg/head"]
            assert ratio == pytest.approx(reg / row["train/task_loss"])
        assert re.search(r"epoch 1/2: .*reg_to_task [\d.e+-]+;", err)  # every epoch's log line
        if out == balanced:
            assert max(ratios) < 10 and warning not in err
        else:
            assert ratios[0] > 10  # DELTA then pulls the features back: later epochs differ
            # a large ratio alone is no harm: the warning needs a task loss that stopped falling
            # (tests/test_data_faults.py checks the rule on given metrics)
            task = [row["train/task_loss"] for row in rows]
            stalled = ratios[1] > 10 and task[1] >= task[0]
            assert (warning in err) == stalled, (ratios, task)


# ------------------------------------------------------------------------------------------------
# Bad data
# ------------------------------------------------------------------------------------------------
def _png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header and a tiny IDAT for an image of ``width x height`` RGB pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + body + chunk(b"IEND", b"")


def _rgb(seed: int = 0, size: int = 24) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _write_odd(folder: Path, kind: str) -> Path:
    """A valid image in an unusual mode or format; returns its path."""
    image = _rgb(1)
    if kind == "16-bit":
        path = folder / "gray16.png"
        values = np.linspace(0, 65535, 24 * 24).reshape(24, 24).astype(np.uint16)
        Image.fromarray(values).save(path)  # mode I;16
    elif kind == "cmyk":
        path = folder / "cmyk.jpg"
        image.convert("CMYK").save(path)
    elif kind == "palette":
        path = folder / "palette.png"
        image.convert("P", palette=Image.Palette.ADAPTIVE).save(path, transparency=0)
    elif kind == "animated":
        path = folder / "animated.gif"
        frames = [_rgb(seed).convert("P") for seed in range(3)]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    elif kind == "rgba":
        path = folder / "rgba.png"
        image.convert("RGBA").save(path)
    else:
        raise AssertionError(kind)
    return path


def _write_bad(folder: Path, kind: str) -> Path:
    """A file the loader must skip; returns the path it is listed under."""
    png = folder / "valid-source.png.bak"  # not an image extension: never listed
    _rgb(2).save(png, format="PNG")
    whole = png.read_bytes()
    png.unlink()
    path = folder / {"non-image": "notes.jpg", "symlink-loop": "loop.png"}.get(kind, f"{kind}.png")
    if kind == "truncated":
        path.write_bytes(whole[: len(whole) // 2])
    elif kind == "zero-byte":
        path.write_bytes(b"")
    elif kind == "non-image":
        path.write_text("shopping list: eggs, milk\n")
    elif kind == "huge":
        path.write_bytes(_png_claiming(100_000, 100_000))  # 10^10 pixels: a decompression bomb
    elif kind == "symlink-loop":
        path.symlink_to(path.name)  # loop.png -> loop.png
    elif kind == "dangling":
        path.symlink_to(folder / "gone.png")
    elif kind == "fifo":
        os.mkfifo(path)  # opening it for reading would block for ever
    elif kind == "unreadable":
        path.write_bytes(whole)
        path.chmod(0)
    else:
        raise AssertionError(kind)
    return path


BAD_KINDS = (
    "truncated", "zero-byte", "non-image", "huge", "symlink-loop", "dangling", "fifo", "unreadable",
)  # fmt: skip
ODD_KINDS = ("16-bit", "cmyk", "palette", "animated", "rgba")


@pytest.fixture
def unreadable_as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """chmod 000 does not stop root: simulate EACCES on open for files with mode 000."""
    if os.geteuid() != 0:
        return  # the real permission check applies
    real_open = Image.open

    def open_checked(fp: Any, *args: Any, **kwargs: Any) -> Image.Image:
        if isinstance(fp, (str, os.PathLike)) and os.stat(fp).st_mode & 0o777 == 0:
            raise PermissionError(errno.EACCES, "Permission denied", str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", open_checked)


@pytest.mark.usefixtures("unreadable_as_root")
@pytest.mark.parametrize("kind", BAD_KINDS + ODD_KINDS)
def test_image_folder_skips_or_converts_every_kind_of_file(
    kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "ant"
    folder.mkdir()
    _rgb(0).save(folder / "good.png")
    path = _write_bad(folder, kind) if kind in BAD_KINDS else _write_odd(folder, kind)
    dataset = ImageFolder(tmp_path)
    assert [Path(p).name for p, _ in dataset.samples] == sorted(["good.png", path.name])
    with caplog.at_level(logging.WARNING, logger="deltaft"), _deadline(60):
        skipped = dataset.verify()
        images = [dataset[i][0] for i in range(len(dataset))]
    assert all(image.mode == "RGB" and image.size[0] > 0 for image in images)
    if kind in BAD_KINDS:
        assert skipped == [str(path)]
        [record] = caplog.records
        assert record.getMessage().startswith(f"Skipping unreadable image {path} (")
        assert images[0].tobytes() == images[1].tobytes()  # replaced by the readable image
    else:
        assert skipped == [] and not caplog.records


def test_symlinked_folder_cycles_are_listed_once(tmp_path: Path) -> None:
    folder = tmp_path / "ant"
    (folder / "sub").mkdir(parents=True)
    _rgb(0).save(folder / "a.png")
    _rgb(1).save(folder / "sub" / "b.png")
    (folder / "sub" / "up").symlink_to(folder, target_is_directory=True)  # sub/up -> ant
    (folder / "self").symlink_to(".", target_is_directory=True)
    with _deadline(30):
        dataset = ImageFolder(tmp_path)
    assert sorted(Path(p).name for p, _ in dataset.samples) == ["a.png", "b.png"]


@pytest.mark.usefixtures("unreadable_as_root")
def test_bad_files_are_counted_in_the_run_summary(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fuzzed = tmp_path / "data"
    shutil.copytree(data, fuzzed)
    bad = [_write_bad(fuzzed / "train" / CLASSES[i % 4], kind) for i, kind in enumerate(BAD_KINDS)]
    bad.append(_write_bad(fuzzed / "val" / "ant", "truncated"))
    for i, kind in enumerate(ODD_KINDS):
        _write_odd(fuzzed / "train" / CLASSES[i % 4], kind)
    out = tmp_path / "run"
    argv = _train_argv(fuzzed, out, "--workers", "0", "--method", "l2", "--epochs", "1")
    with _deadline(180):
        code, stdout, err = run_main(capsys, *argv)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == {"count": len(bad), "files": sorted(str(p) for p in bad)}
    assert summary["train_images"] == 32 + len(ODD_KINDS)  # unreadable files leave the split
    for path in bad:
        assert err.count(f"Skipping unreadable image {path} (") == 1
    assert f"skipped {len(bad)} unreadable image(s)" in stdout


# ------------------------------------------------------------------------------------------------
# Untrusted files
# ------------------------------------------------------------------------------------------------
class _Touch:
    """Unpickling this creates ``path``: a stand-in for arbitrary code execution."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return Path.touch, (self.path,)


@pytest.fixture
def finished_run(reference: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    return run


def _plant_pickle(path: Path, marker: Path, **fields: Any) -> None:
    """A checkpoint-shaped pickle that runs code when loaded without ``weights_only``."""
    torch.save({"format": tracking.CHECKPOINT_FORMAT, **fields, "model": _Touch(marker)}, path)


def test_planted_pickle_payload_is_live(tmp_path: Path) -> None:
    """The payload the tests below plant does run code on an unsafe load."""
    marker = tmp_path / "pwned"
    _plant_pickle(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("target", ["eval", "resume", "weights", "attention", "config", "yaml"])
def test_untrusted_files_never_run_code(
    target: str,
    data: Path,
    finished_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    _plant_pickle(evil, marker, config={"model": MODEL}, epoch=1)
    yaml_payload = f"method: !!python/object/apply:os.system ['touch {marker}']\n"
    fresh = tmp_path / "fresh"
    if target == "eval":
        shutil.copy(evil, finished_run / "checkpoints" / "best.pt")
        argv = ["eval", "--run", str(finished_run), "--device", "cpu"]
        match = rf"{finished_run}/checkpoints/best.pt is not a readable checkpoint \(Weights only"
    elif target == "resume":
        shutil.copy(evil, finished_run / "checkpoints" / "last.pt")
        argv = [*_train_argv(data, finished_run), "--resume"]
        match = rf"{finished_run}/checkpoints/last.pt is not a readable checkpoint \(Weights only"
    elif target == "weights":
        argv = _train_argv(data, fresh)
        argv[argv.index("none")] = str(evil)
        match = rf"refusing to load {evil}: it is not a plain weights file"
    elif target == "attention":
        disguised = tmp_path / "attention.safetensors"
        shutil.copy(evil, disguised)
        argv = _train_argv(data, fresh, "--attention", str(disguised))
        match = rf"--attention {disguised}: {disguised} is not a readable safetensors file"
    elif target == "config":
        (tmp_path / "evil.yaml").write_text(yaml_payload)
        argv = _train_argv(data, fresh, "--config", str(tmp_path / "evil.yaml"))
        match = r"Config file .*evil.yaml is not valid YAML"
    else:  # the run's own config.yaml, read back by --resume
        (finished_run / "config.yaml").write_text(yaml_payload)
        argv = ["--threads", "1", "train", "--out", str(finished_run), "--resume"]
        match = r"Config file .*config.yaml is not valid YAML"
    code, stdout, err = run_main(capsys, "-q", *argv)
    assert code == 2 and stdout == ""
    [line] = err.splitlines()
    assert re.match(rf"deltaft: error: {match}", line), line
    assert not marker.exists()
    assert not fresh.exists()


def test_attention_of_other_weights_is_refused(
    data: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Same architecture, other weights: only the fingerprint tells them apart."""
    from tests.toy_models import tiny_cnn

    torch.manual_seed(123)
    weights = tmp_path / "other.pt"
    torch.save(tiny_cnn().state_dict(), weights)
    argv = _train_argv(
        data, tmp_path / "run", "--attention", str(reference / "attention.safetensors")
    )
    argv[argv.index("none")] = str(weights)
    code, _, err = run_main(capsys, "-q", *argv)
    assert code == 2
    [line] = err.splitlines()
    assert line.startswith(f"deltaft: error: --attention {reference / 'attention.safetensors'}: ")
    assert re.search(
        r"estimated for model [0-9a-f]{16}, but this model is [0-9a-f]{16} \(other", line
    )
    assert not (tmp_path / "run").exists()


def test_checkpoint_of_other_weights_is_refused(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--resume after the source weights file changed: the checkpoint's fingerprint differs."""
    from tests.toy_models import tiny_cnn

    weights = tmp_path / "source.pt"
    torch.manual_seed(1)
    torch.save(tiny_cnn().state_dict(), weights)
    out = tmp_path / "run"
    argv = _train_argv(data, out, "--workers", "0", "--method", "l2sp", "--epochs", "1")
    argv[argv.index("none")] = str(weights)
    code, _, err = run_main(capsys, *argv)
    assert code == 0, err
    before = (out / "checkpoints" / "last.pt").read_bytes()
    torch.manual_seed(2)
    torch.save(tiny_cnn().state_dict(), weights)  # same name, other weights
    code, _, err = run_main(capsys, "-q", *argv, "--resume")
    assert code == 2
    [line] = err.splitlines()
    assert line == (
        f"deltaft: error: The source weights ({MODEL}, --weights {weights}) differ from those "
        f"the run in {out} started from; resume with the same weights or start a new --out."
    )
    assert (out / "checkpoints" / "last.pt").read_bytes() == before


def test_eval_refuses_a_checkpoint_of_another_model(
    finished_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = finished_run / "checkpoints" / "best.pt"
    state = load_state(path)
    state["config"]["model"] = "tests.toy_models:other_cnn"  # a wider network
    torch.save(state, path)
    code, stdout, err = run_main(
        capsys, "-q", "eval", "--run", str(finished_run), "--device", "cpu",
        "--model", "tests.toy_models:other_cnn",
    )  # fmt: skip
    assert code == 2 and stdout == ""
    [line] = err.splitlines()
    assert line.startswith(f"deltaft: error: {path} holds weights that do not fit ")
    assert "tests.toy_models:other_cnn" in line


# ------------------------------------------------------------------------------------------------
# Disk full and read-only output
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["disk-full", "read-only"])
def test_failed_checkpoint_write_keeps_the_previous_one(
    fault: str,
    data: Path,
    reference: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Epoch 2's last.pt cannot be written: epoch 1's stays, and --resume finishes the run."""
    out = tmp_path / "run"
    last = out / "checkpoints" / "last.pt"
    real_create = _utils._create_temporary
    before: list[bytes] = []

    def failing_create(path: Path) -> tuple[int, str]:
        fd, name = real_create(path)
        if not (Path(name).name.startswith(".last.pt.") and last.exists()):
            return fd, name
        before.append(last.read_bytes())  # epoch 1's checkpoint, as the failure finds it
        if fault == "read-only":  # what os.open raises in a read-only folder
            os.close(fd)
            os.unlink(name)
            raise PermissionError(errno.EACCES, "Permission denied", str(last.parent))
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name  # every write: ENOSPC

    monkeypatch.setattr(_utils, "_create_temporary", failing_create)
    code, stdout, err = run_main(capsys, *_train_argv(data, out))
    assert code == 1 and stdout == ""
    [line] = _error_lines(err)
    error = {"disk-full": "OSError: [Errno 28", "read-only": "PermissionError: [Errno 13"}[fault]
    reason = {"disk-full": "No space left on device", "read-only": "Permission denied"}[fault]
    assert line == (
        f"deltaft: error: {error}] Could not write {last} ({reason}); last.pt is unchanged"
    )
    assert before and last.read_bytes() == before[0]
    assert load_state(last)["epoch"] == 1
    assert not list(out.rglob("*.tmp"))
    assert [row["epoch"] for row in _metrics(out)] == [1]

    monkeypatch.setattr(_utils, "_create_temporary", real_create)  # space freed
    code, _, err = run_main(capsys, *_train_argv(data, out), "--resume")
    assert code == 0, err
    _assert_same_run(out, reference)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders anyway")
def test_read_only_checkpoint_folder(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real chmod (the test above simulates it, for root): epoch 1's checkpoints stay."""
    out = tmp_path / "run"
    folder = out / "checkpoints"
    counter = itertools.count(1)
    original = TransferObjective.forward

    def read_only_in_epoch_2(self: TransferObjective, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        if next(counter) == STEPS + 1:
            folder.chmod(0o555)
        return original(self, x, y)

    monkeypatch.setattr(TransferObjective, "forward", read_only_in_epoch_2)
    try:
        code, _, err = run_main(capsys, *_train_argv(data, out, "--workers", "0"))
    finally:
        folder.chmod(0o755)
    assert code == 1
    [line] = _error_lines(err)
    assert re.match(
        rf"deltaft: error: PermissionError: \[Errno 13\] Could not write {folder}/(best|last).pt "
        r"\(Permission denied\); (best|last).pt is unchanged$",
        line,
    ), line
    assert load_state(folder / "last.pt")["epoch"] == 1
    assert not list(out.rglob("*.tmp"))


# ------------------------------------------------------------------------------------------------
# Distributed faults
# ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker_of_rank(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker with ``RANK=rank`` (read from /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent and f"RANK={rank}".encode() in (entry / "environ").read_bytes():
                return int(entry.name)
    return None


def _wait_for(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("launcher", "fault"), [("torchrun", "dies"), ("env", "dies"), ("env", "hangs")]
)
def test_a_failed_worker_does_not_leave_the_other_waiting(
    launcher: str, fault: str, data: Path, tmp_path: Path
) -> None:
    """Rank 1 is SIGKILLed (dies) or SIGSTOPped (hangs) after epoch 1; rank 0 must exit with an
    error within a bound: at once for a death, after DELTAFT_DIST_TIMEOUT (20 s) for a hang.

    ``torchrun`` tears the group down itself when a worker dies; ``env`` starts the two workers
    the way torchrun does (RANK, WORLD_SIZE, MASTER_ADDR/PORT) but without its agent, as with
    one agent per machine, so that rank 0 has only its own error handling to rely on.
    """
    out = tmp_path / "run"
    argv = _train_argv(data, out, "--workers", "0", "--method", "l2", "--epochs", "200")
    port = str(_free_port())
    env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, DELTAFT_DIST_TIMEOUT="20")
    log = tmp_path / "rank0.log"
    processes: list[subprocess.Popen[bytes]] = []
    try:
        if launcher == "torchrun":
            agent = subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                 "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", port,
                 "-m", "deltaft", *argv],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"),
            )  # fmt: skip
            processes.append(agent)
            _wait_for(lambda: _worker_of_rank(agent.pid, 1) is not None, 60)
            rank1 = _worker_of_rank(agent.pid, 1)
            assert rank1 is not None
        else:
            for rank in range(2):
                ranked = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "deltaft", *argv],
                        cwd=ROOT,
                        env={**env, **ranked, "LOCAL_WORLD_SIZE": "2"},
                        stdout=subprocess.DEVNULL,
                        stderr=(log if rank == 0 else tmp_path / "rank1.log").open("w"),
                    )
                )
            rank1 = processes[1].pid
        _wait_for(lambda: (out / "metrics.jsonl").is_file() and bool(_metrics(out)), 120)
        assert processes[0].poll() is None, log.read_text()[-2000:]
        os.kill(rank1, signal.SIGKILL if fault == "dies" else signal.SIGSTOP)
        started = time.monotonic()
        code = processes[0].wait(timeout=120)
        waited = time.monotonic() - started
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        with contextlib.suppress(ProcessLookupError, UnboundLocalError):
            os.kill(rank1, signal.SIGKILL)
        for process in processes:
            process.wait()
    text = log.read_text()
    assert code != 0, text[-2000:]
    assert waited < (20 + 40 if fault == "hangs" else 30), (waited, text[-2000:])
    if launcher == "env":
        assert ("Timed out" if fault == "hangs" else "Connection") in text, text[-2000:]
