"""Run lifecycle (issue 12): one writer per run folder, signals, workers that die with their
parent, checkpoints that name what they depend on, and errors about the run folder.

Everything runs on CPU with the toy CNN of ``tests/toy_models.py`` and one torch thread;
subprocesses are killed (with their process group) when a test ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from deltaft.app import train
from deltaft.app.tracking import LOCK_NAME, RunDir
from deltaft.attention import ChannelAttention
from deltaft.cli import main
from deltaft.objective import TransferObjective
from tests.cli_support import (  # noqa: F401 (autouse fixtures)
    MODEL,
    load_state,
    one_thread,
    restore_logging,
    run_main,
    write_images,
)

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes: 4 train images each (4 steps of 4 per epoch), 1 val and 1 test image each."""
    root = tmp_path_factory.mktemp("data")
    for split, n, seed in (("train", 4, 0), ("val", 1, 1), ("test", 1, 2)):
        write_images(root, split, n, seed)
    return root


def _argv(data: Path, out: Path, *extra: str, method: str = "l2", epochs: int = 2) -> list[str]:
    return [
        "--threads", "1", "train", "--data", str(data), "--model", MODEL, "--weights", "none",
        "--method", method, "--out", str(out), "--image-size", "32", "--batch-size", "4",
        "--epochs", str(epochs), "--attention-epochs", "1", "--attention-batches", "2",
        "--workers", "0", "--device", "cpu", "--log-every", "1", *extra,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return env


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("deltaft: error:")]


@contextlib.contextmanager
def _child(argv: list[str]) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """``python -m deltaft argv`` in its own process group, its stderr lines collected by a
    thread; the group is SIGKILLed when the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "deltaft", *argv], cwd=ROOT, env=_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        lines.extend(proc.stderr)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield proc, lines
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(5)


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------
# Class 1: one run folder, one writer
# ------------------------------------------------------------------------------------------------
def test_a_claimed_run_folder_refuses_a_second_writer(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    holder = RunDir(out)
    holder.claim()
    try:
        for extra in ((), ("--resume",)):
            code, _, err = run_main(capsys, *_argv(data, out, *extra))
            assert code == 2, err
            assert _errors(err) == [
                f"deltaft: error: --out {out} is in use by another deltaft process (it holds "
                f"{out / LOCK_NAME}); wait for it to finish or stop it, or choose another --out."
            ]
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]  # nothing written
    finally:
        holder.release()
    assert not out.exists()  # the claim removed what it created and nothing else was written
    code, _, err = run_main(capsys, *_argv(data, out))
    assert code == 0, err
    assert not RunDir(out).claimed and (out / "summary.json").is_file()


def test_two_processes_on_one_folder_one_is_refused_and_a_kill_leaves_no_stale_lock(
    data: Path, tmp_path: Path
) -> None:
    """Two runs started at once on one new folder: one trains, the other exits with status 2
    and one line (before the fix both trained into the folder and both exited 0)."""
    out = tmp_path / "run"
    argv = _argv(data, out, epochs=10_000)
    with _child(argv) as (one, one_lines), _child(argv) as (two, two_lines):
        _wait_for(lambda: one.poll() is not None or two.poll() is not None, "a refusal")
        refused, lines = (one, one_lines) if one.poll() is not None else (two, two_lines)
        survivor = two if refused is one else one
        _wait_for(lambda: bool(_errors("".join(lines))), "the refusal's line", timeout=10)
        assert refused.returncode == 2, "".join(lines)[-2000:]
        errors = _errors("".join(lines))
        assert len(errors) == 1, "".join(lines)[-2000:]
        assert "in use by another deltaft process" in errors[0] or "already holds" in errors[0]
        assert "Traceback" not in "".join(lines)
        # A resume while the survivor trains is refused too, and leaves it alone.
        resumed = subprocess.run(
            [sys.executable, "-m", "deltaft", *argv, "--resume"],
            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S,
        )  # fmt: skip
        assert resumed.returncode == 2, resumed.stderr[-2000:]
        assert _errors(resumed.stderr) == [
            f"deltaft: error: --out {out} is in use by another deltaft process (it holds "
            f"{out / LOCK_NAME}); wait for it to finish or stop it, or choose another --out."
        ]
        assert survivor.poll() is None
        os.killpg(survivor.pid, signal.SIGKILL)
        survivor.wait()
    after = RunDir(out)
    after.claim()  # the kernel dropped the killed process's lock: nothing stuck
    assert after.claimed
    after.release()
    assert (out / LOCK_NAME).is_file()  # a run folder keeps its (unlocked) lock file


# ------------------------------------------------------------------------------------------------
# Class 7: SIGTERM is a stop; an interrupt says only what is true
# ------------------------------------------------------------------------------------------------
def test_sigterm_saves_progress_and_says_how_to_continue_like_ctrl_c(
    data: Path, tmp_path: Path
) -> None:
    """docker stop, Slurm and systemd send SIGTERM: before the fix the run died (status -15)
    without saving the epoch's progress."""
    out = tmp_path / "run"
    argv = _argv(data, out, epochs=10_000)
    with _child(argv) as (proc, lines):
        _wait_for(lambda: any(" step 2/4 " in line for line in lines), "a training step")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(TIMEOUT_S)
        _wait_for(lambda: bool(_errors("".join(lines))) or code != 130, "the last line", 10)
    err = "".join(lines)
    assert code == 130, err[-2000:]
    (line,) = _errors(err)
    # The signal lands at or after the step line: mid-epoch or just after an epoch's end.
    assert re.match(
        r"deltaft: error: Interrupted (at epoch \d+, step \d/4; saved|after epoch)", line
    )
    assert line.endswith(f"continue it with: deltaft train --out {out} --resume"), line
    assert (out / "checkpoints" / "last.pt").is_file()
    assert "Traceback" not in err


def test_sigterm_in_process_stops_after_the_step_and_handlers_are_restored(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = iter(range(1, 100))
    original = TransferObjective.forward

    def terminated(self: TransferObjective, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        if next(calls) == 6:  # epoch 2, step 2
            signal.raise_signal(signal.SIGTERM)
        return original(self, x, y)

    monkeypatch.setattr(TransferObjective, "forward", terminated)
    out = tmp_path / "run"
    code, _, err = run_main(capsys, *_argv(data, out, epochs=3))
    assert code == 130, err
    assert _errors(err) == [
        f"deltaft: error: Interrupted at epoch 2, step 2/4; saved {out}/checkpoints/last.pt; "
        f"continue it with: deltaft train --out {out} --resume"
    ]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.undo()
    code, _, err = run_main(capsys, *_argv(data, out, epochs=3), "--resume")
    assert code == 0, err
    assert load_state(out / "checkpoints" / "last.pt")["epoch"] == 3


@pytest.mark.parametrize(
    ("checkpoint", "where"), [(False, "estimate_attention"), (True, "build_run")]
)
def test_ctrl_c_before_training_says_what_was_saved(
    checkpoint: bool,
    where: str,
    data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C while the attention is estimated, or while a resumed run is built: before the fix
    the line said "continue a training run with --resume" though nothing had been saved."""
    out = tmp_path / "run"
    argv = _argv(data, out, method="delta", epochs=2)
    if checkpoint:  # a run with a checkpoint, interrupted while resuming
        code, _, err = run_main(capsys, *argv)
        assert code == 0, err
        argv = [*argv, "--resume"]

    def interrupted(*args: object, **kwargs: object) -> None:
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(train, where, interrupted)
    code, _, err = run_main(capsys, *argv)
    assert code == 130, err
    if checkpoint:
        expected = (
            f"Interrupted; {out}/checkpoints/last.pt is unchanged; continue it with: deltaft "
            f"train --out {out} --resume"
        )
    else:
        expected = (
            "Interrupted before the run started: nothing was saved; run the same command again."
        )
        assert not out.exists()  # so the same command starts again
    assert _errors(err) == [f"deltaft: error: {expected}"]
    torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------
# Class 2: compare --jobs workers die with their parent
# ------------------------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_compare_jobs_die_with_their_parent(sig: int, data: Path, tmp_path: Path) -> None:
    """Before the fix the jobs went on training after their parent was killed or terminated,
    and a rerun trained the same folders twice at once."""
    out = tmp_path / "cmp"
    argv = [
        "--threads", "2", "compare", "--data", str(data), "--model", MODEL, "--weights",
        "none", "--methods", "l2,l2sp", "--seeds", "1", "--jobs", "2", "--out", str(out),
        "--image-size", "32", "--batch-size", "4", "--epochs", "10000", "--workers", "0",
        "--device", "cpu",
    ]  # fmt: skip
    jobs: list[int] = []
    with _child(argv) as (parent, lines):
        runs = [out / name / "checkpoints" / "last.pt" for name in ("l2-seed0", "l2sp-seed0")]
        _wait_for(lambda: all(run.is_file() for run in runs), "both jobs training")
        jobs = [pid for pid in _children(parent.pid) if "spawn_main" in _cmdline(pid)]
        assert len(jobs) == 2, [_cmdline(pid) for pid in _children(parent.pid)]
        try:
            parent.send_signal(sig)
            code = parent.wait(TIMEOUT_S)
            _wait_for(lambda: not any(_alive(pid) for pid in jobs), "the jobs to end", 20)
        finally:
            for pid in jobs:  # only the processes this test found
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    if sig == signal.SIGTERM:
        assert code == 130, "".join(lines)[-2000:]
        assert _errors("".join(lines)) == [
            "deltaft: error: interrupted; the finished runs are kept, and the same command "
            "continues the others from their last finished epoch."
        ]


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    return ""


# ------------------------------------------------------------------------------------------------
# Classes 6 and 10: checkpoints name what they depend on, and hold what they must
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def delta_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-epoch DELTA run, copied by each test that changes it."""
    out = tmp_path_factory.mktemp("delta") / "run"
    code = main(_argv(data, out, method="delta"))
    assert code == 0
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "summary.json").unlink()  # as if interrupted after its last checkpoint
    return copy


def _resume(capsys: pytest.CaptureFixture[str], data: Path, out: Path) -> tuple[int, str]:
    code, _, err = run_main(capsys, *_argv(data, out, method="delta"), "--resume")
    assert "Traceback" not in err
    return code, err


def test_checkpoints_record_the_attention_file(delta_run: Path) -> None:
    digest = hashlib.sha256((delta_run / "attention.safetensors").read_bytes()).hexdigest()
    for name in ("last", "best"):
        assert load_state(delta_run / "checkpoints" / f"{name}.pt")["attention_sha256"] == digest


@pytest.mark.parametrize("change", ["another", "deleted"])
def test_resume_with_another_or_no_attention_file_is_refused(
    change: str, delta_run: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before the fix a resume used another valid attention file (or estimated a new one)
    silently and reported the mixed run's numbers."""
    out = _copy(delta_run, tmp_path)
    path = out / "attention.safetensors"
    if change == "another":
        attention = ChannelAttention.load(path)
        weights = {k: w.flip(0) / w.sum() for k, w in attention.weights.items()}  # still valid
        dataclasses.replace(attention, weights=weights).save(path)
        expected = f"{path} is not the attention file {out}/checkpoints/last.pt was trained with"
    else:
        path.unlink()
        expected = f"{path}, the attention {out}/checkpoints/last.pt was trained with, is missing"
    code, err = _resume(capsys, data, out)
    assert code == 2, err
    (line,) = _errors(err)
    assert line.startswith(f"deltaft: error: {expected}"), line
    assert not (out / "summary.json").exists()


def test_resume_without_best_pt_is_refused_not_reported(
    delta_run: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before the fix the summary reported the last epoch's test accuracy as the best's."""
    out = _copy(delta_run, tmp_path)
    best_epoch = load_state(out / "checkpoints" / "last.pt")["best"]["epoch"]
    (out / "checkpoints" / "best.pt").unlink()
    code, err = _resume(capsys, data, out)
    assert code == 2, err
    assert _errors(err) == [
        f"deltaft: error: {out}/checkpoints/best.pt (the weights of epoch {best_epoch}, the best "
        "by validation accuracy) is missing; restore it, or start a new run in another folder."
    ]


def test_a_best_pt_of_another_epoch_is_refused(
    delta_run: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _copy(delta_run, tmp_path)
    best = out / "checkpoints" / "best.pt"
    state = load_state(best)
    torch.save({**state, "epoch": state["epoch"] + 7}, best)
    code, err = _resume(capsys, data, out)
    assert code == 2, err
    (line,) = _errors(err)
    assert f"{best} is not this run's best epoch (it holds epoch {state['epoch'] + 7}" in line


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda state: state.pop(key)


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda state: state.__setitem__(key, value)


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (_drop("rng"), "its 'rng' is missing, expected a dict"),
        (_drop("optimizer"), "its 'optimizer' is missing, expected a dict"),
        (_drop("config"), "its 'config' is missing, expected a dict"),
        (_set("epoch", -1), "its 'epoch' is -1, expected an integer >= 0"),
        (_set("epoch", 9), "epoch 9 is after the run's last epoch 2"),
        (_set("global_step", "7"), "its 'global_step' is '7', expected an integer >= 0"),
        (lambda s: s["rng"].pop("numpy"), "its RNG state lacks numpy"),
        (_set("best", {"epoch": 5, "val_accuracy": 0.5}), "its best epoch 5 is not one of"),
        (_set("partial", {"epoch": 1, "step": 2}), "its interrupted epoch"),
        (_set("metrics", []), "it holds 0 metrics rows for 2 epoch(s)"),
        (
            _set("model", {"conv.weight": torch.zeros(3, 3)}),
            "does not fit the model and optimizer this run builds",
        ),
    ],
)
def test_a_checkpoint_lacking_fields_or_with_impossible_values_is_refused(
    tamper: Callable[[dict[str, Any]], None],
    expected: str,
    delta_run: Path,
    data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Before the fix these were a KeyError, a RuntimeError traceback, or a run that went on."""
    out = _copy(delta_run, tmp_path)
    last = out / "checkpoints" / "last.pt"
    state = load_state(last)
    tamper(state)
    torch.save(state, last)
    code, err = _resume(capsys, data, out)
    assert code == 2, err
    (line,) = _errors(err)
    assert line.startswith(f"deltaft: error: {last}"), line
    assert expected in line, line


# ------------------------------------------------------------------------------------------------
# Classes 12 and 13: the run folder is checked before any work
# ------------------------------------------------------------------------------------------------
def test_an_out_that_cannot_be_created_is_refused_before_building(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before the fix the model, data and attention were built, then the first write failed."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = blocker / "run"
    code, _, err = run_main(capsys, *_argv(data, out, method="delta"))
    assert code == 2, err
    assert _errors(err) == [
        f"deltaft: error: --out {out} cannot be written (Not a directory); choose a folder you "
        "can write to."
    ]
    assert "Built" not in err  # nothing was built


def test_a_dangling_symlink_out_is_one_line(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "link"
    out.symlink_to(tmp_path / "gone")
    code, _, err = run_main(capsys, *_argv(data, out))
    assert code == 2, err
    assert _errors(err) == [
        f"deltaft: error: --out {out} is a symbolic link to {tmp_path / 'gone'}, which does not "
        "exist; create its target or choose another --out."
    ]
    assert "Built" not in err
