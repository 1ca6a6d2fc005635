"""End to end: ``deltaft train / attention / eval / layers / compare`` on a generated image folder.

Runs go through ``deltaft.cli.main`` in-process (one subprocess checks ``python -m deltaft``),
with the 4-class toy CNN of ``tests/toy_models.py`` at 32 px on CPU.
"""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from deltaft.app.build import build_data
from deltaft.app.config import TrainConfig, load_config
from deltaft.app.models import build_model
from deltaft.cli import ProgressPrinter, main
from deltaft.cli.console import configure_logging
from deltaft.engine import Progress
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
CORRUPT = "train/ant/zz-corrupt.png"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes: 6 train, 2 val, 3 test images each, and one corrupt training file."""
    root = tmp_path_factory.mktemp("data")
    for split, n, seed in (("train", 6, 0), ("val", 2, 1), ("test", 3, 2)):
        write_images(root, split, n, seed, gray_index=1)
    (root / CORRUPT).write_bytes(b"not a png")
    return root


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--threads", "1", "train", "--data", str(data), "--model", MODEL, "--weights", "none",
        "--out", str(out), "--image-size", "32", "--batch-size", "8", "--epochs", "2",
        "--attention-epochs", "1", "--attention-batches", "2", "--workers", "0",
        "--device", "cpu", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def delta_run(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "delta"
    assert main(_train_args(folder, out, "--method", "delta")) == 0
    return out


def _untimed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------
# train, every method
# ------------------------------------------------------------------------------------------------
def _check_run(run: Path, method: str) -> dict[str, Any]:
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "curves.png"} <= names
    assert ("attention.safetensors" in names) == (method == "delta")
    assert ("attention.png" in names) == (method == "delta")
    assert not [p for p in run.rglob("*.tmp")]  # atomic writes leave no temporary files
    rows = _metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    reg = {"l2": [], "l2sp": ["reg/l2sp", "reg/head"], "fm": ["reg/fm", "reg/head"]}
    parts = ["loss", "task_loss", "acc", *reg.get(method, ["reg/delta", "reg/head"])]
    for row in rows:
        assert {f"train/{p}" for p in parts} | {"val/acc", "val/loss", "lr", *TIMING_KEYS} <= set(
            row
        )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == method and summary["epochs"] == 2 and summary["steps"] == 6
    assert summary["val_accuracy"] == rows[-1]["val/acc"]
    assert 0 <= summary["test_accuracy"] <= 1 and summary["test_images"] == 12
    assert summary["skipped"]["count"] == 1
    assert summary["skipped"]["files"][0].endswith(CORRUPT)
    best = max(rows, key=lambda r: r["val/acc"])  # the first of equal maxima
    assert summary["best_epoch"] == best["epoch"]
    last = load_state(run / "checkpoints" / "last.pt")  # weights_only=True loads it
    assert {"model", "optimizer", "scheduler", "rng", "epoch", "config", "classes", "head"} <= set(
        last
    )
    assert last["classes"] == list(CLASSES) and last["head"] == "fc" and last["epoch"] == 2
    assert load_state(run / "checkpoints" / "best.pt")["epoch"] == best["epoch"]
    cfg = TrainConfig.from_sources(load_config(run / "config.yaml"))
    assert cfg.method == method and cfg.out == str(run)
    return summary


def test_train_delta(delta_run: Path, folder: Path) -> None:
    summary = _check_run(delta_run, "delta")
    assert summary["layers"] == ["stage1", "stage2"]  # the default rule: last block of each stage


@pytest.mark.parametrize("method", ["l2", "l2sp", "fm"])
def test_train_baselines(
    method: str, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # one run with a worker process and the oneDNN-packed source
    extra = ["--workers", "1", "--source-mkldnn"] if method == "fm" else []
    code, out, err = run_main(
        capsys, *_train_args(folder, tmp_path / method, "--method", method, *extra)
    )
    assert code == 0, err
    assert "test accuracy:" in out and "val accuracy:" in out
    assert f"Skipping unreadable image {folder / CORRUPT}" in err
    assert "epoch 2/2 step 3/3" in err  # plain progress lines: stderr is not a terminal
    _check_run(tmp_path / method, method)
    assert load_config(tmp_path / method / "config.yaml")["source_mkldnn"] is (method == "fm")


def test_iterations_adamw_and_no_validation_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A flat folder (train/test split 80/20, no validation): best.pt is the last epoch."""
    flat = tmp_path / "flat"
    write_images(tmp_path / "tmp", "train", 5, 3, gray_index=1)
    (tmp_path / "tmp" / "train").rename(flat)
    args = _train_args(flat, tmp_path / "run", "--method", "l2", "--optimizer", "adamw")
    args[args.index("--epochs") : args.index("--epochs") + 2] = ["--iterations", "5"]
    augment = ("--hflip", "0", "--crop-scale", "0.5")
    code, out, err = run_main(capsys, *args, "--schedule", "exponential", "--lr", "0.001", *augment)
    assert code == 0, err
    assert "val accuracy" not in out and "test accuracy:" in out
    cfg = TrainConfig.from_sources(load_config(tmp_path / "run" / "config.yaml"))
    assert (cfg.hflip, cfg.crop_scale) == (0.0, 0.5)
    train_tf = build_data(cfg, build_model(MODEL, weights="none")[1], 16).train.transform
    steps = {type(step).__name__: step for step in train_tf.transforms}
    assert "RandomHorizontalFlip" not in steps and steps["RandomResizedCrop"].scale == (0.5, 1.0)
    rows = _metrics(tmp_path / "run")
    assert [row["step"] for row in rows] == [2, 4, 5]  # 16 training images, batch 8, 5 steps
    assert "val/acc" not in rows[0]
    assert rows[-1]["lr"] == pytest.approx(0.001 * 0.1 ** (4 / 5))  # the lr of step 5 of 5
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["best_epoch"], summary["val_accuracy"]) == (3, None)
    assert summary["best_test_accuracy"] == summary["test_accuracy"]
    assert load_state(tmp_path / "run" / "checkpoints" / "best.pt")["epoch"] == 3


# ------------------------------------------------------------------------------------------------
# resume
# ------------------------------------------------------------------------------------------------
def test_interrupted_then_resumed_run_equals_the_uninterrupted_one(
    delta_run: Path,
    folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "resumed"
    original = ProgressPrinter.__call__

    def interrupt(self: ProgressPrinter, p: Progress) -> None:
        original(self, p)
        if (p.epoch, p.step) == (2, 2):
            raise KeyboardInterrupt  # Ctrl-C in the middle of epoch 2

    monkeypatch.setattr(ProgressPrinter, "__call__", interrupt)
    code, _, err = run_main(capsys, *_train_args(folder, out, "--method", "delta"))
    assert err.strip().splitlines()[-1] == (
        f"deltaft: error: Interrupted; {out}/checkpoints/last.pt is unchanged; continue it with: "
        f"deltaft train --out {out} --resume"
    )
    assert code == 130
    assert [r["epoch"] for r in _metrics(out)] == [1]
    assert load_state(out / "checkpoints" / "last.pt")["epoch"] == 1
    monkeypatch.setattr(ProgressPrinter, "__call__", original)

    # Only --out, --resume and the factory model (a run folder never names code to run): the
    # rest comes from the run's config.yaml.
    code, _, err = run_main(
        capsys, "--threads", "1", "train", "--out", str(out), "--resume", "--model", MODEL
    )
    assert code == 0, err
    assert "Resuming" in err and "after epoch 1 of 2" in err
    straight, resumed = (load_state(r / "checkpoints" / "last.pt") for r in (delta_run, out))
    assert straight["model"].keys() == resumed["model"].keys()
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    assert _untimed(_metrics(out)) == _untimed(_metrics(delta_run))
    summaries = [json.loads((r / "summary.json").read_text()) for r in (delta_run, out)]
    for key in ("val_accuracy", "val_loss", "test_accuracy", "test_loss", "best_epoch", "steps"):
        assert summaries[0][key] == summaries[1][key], key


def test_existing_run_is_never_overwritten(
    delta_run: Path, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (delta_run / "summary.json").read_text()
    code, _, err = run_main(capsys, *_train_args(folder, delta_run, "-q"))
    assert code == 2
    assert err == (
        f"deltaft: error: --out {delta_run} already holds a run; use --resume to continue it "
        "or choose a new --out.\n"
    )
    code, _, err = run_main(
        capsys, *_train_args(folder, delta_run, "-q", "--alpha", "0.1", "--resume")
    )
    assert code == 2
    assert err.startswith(
        f"deltaft: error: Cannot resume {delta_run} with changed settings (alpha 0.01 -> 0.1)"
    )
    assert (delta_run / "summary.json").read_text() == before


# ------------------------------------------------------------------------------------------------
# eval, layers, attention, compare
# ------------------------------------------------------------------------------------------------
def test_eval_reproduces_the_summary(delta_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = json.loads((delta_run / "summary.json").read_text())
    code, out, err = run_main(
        capsys, "eval", "--run", str(delta_run), "--device", "cpu", "--model", MODEL
    )
    assert code == 0, err
    assert out.startswith(f"test accuracy {100 * summary['best_test_accuracy']:.2f}%")
    assert "best.pt" in out
    code, out, _ = run_main(
        capsys, "eval", "--run", str(delta_run), "--split", "val", "--checkpoint", "last",
        "--model", MODEL,
    )  # fmt: skip
    assert code == 0
    assert out.startswith(f"val accuracy {100 * summary['val_accuracy']:.2f}%, loss ")


def test_layers_marks_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "layers", "--model", MODEL, "--image-size", "32")
    assert code == 0
    lines = out.splitlines()
    assert any(line.startswith("* stage1 ") and "8x8x8" in line for line in lines)
    assert any(line.startswith("* stage2 ") and "16x4x4" in line for line in lines)
    assert any(line.startswith("  stem.0 ") for line in lines)
    assert lines[-1].endswith("stage1,stage2")


def test_attention_command_matches_training_and_is_reusable(
    delta_run: Path, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "att.safetensors"
    code, out, err = run_main(
        capsys, "--threads", "1", "attention", "--data", str(folder), "--model", MODEL,
        "--weights", "none", "--out", str(path), "--image-size", "32", "--batch-size", "8",
        "--attention-epochs", "1", "--attention-batches", "2", "--workers", "0",
        "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    assert f"wrote {path}" in out and "stage2: 16 channels" in out
    estimated, trained = load_file(path), load_file(delta_run / "attention.safetensors")
    assert estimated.keys() == trained.keys()
    for key, value in estimated.items():  # same seed and data: the very same attention
        assert torch.equal(value, trained[key]), key
    run = tmp_path / "reuse"
    code, _, err = run_main(
        capsys, *_train_args(folder, run, "--attention", str(path), "--epochs", "1")
    )
    assert code == 0, err
    assert "attention:" not in err  # loaded, not estimated
    assert torch.equal(load_file(run / "attention.safetensors")["weights/stage1"],
                       estimated["weights/stage1"])  # fmt: skip


def test_compare_end_to_end(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    code, stdout, err = run_main(
        capsys, "--threads", "1", "compare", "--methods", "l2,delta", "--seeds", "1",
        "--data", str(folder), "--model", MODEL, "--weights", "none", "--out", str(out),
        "--image-size", "32", "--batch-size", "8", "--epochs", "1", "--attention-epochs", "1",
        "--workers", "0", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    assert "| l2 |" in stdout and "| delta |" in stdout
    assert (out / "l2-seed0" / "summary.json").is_file()
    assert (out / "delta-seed0" / "attention.safetensors").is_file()


# ------------------------------------------------------------------------------------------------
# user errors: exit status 2 and one line on stderr
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    unreadable = root / "unreadable"
    write_images(unreadable, "train", 3, 0, gray_index=1)
    for path in (unreadable / "train" / "bee").iterdir():
        path.write_bytes(b"garbage")
    (root / "bad.yaml").write_text("alpah: 0.1\n")
    return {"missing": root / "missing", "empty": root / "empty", "unreadable": unreadable,
            "yaml": root / "bad.yaml"}  # fmt: skip


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing", r"Data folder .*missing does not exist"),
        ("empty", r"Data folder .*empty has no class folders"),
        ("unreadable", r"Class folder\(s\) .*bee have no readable image"),
        ("model", r"Unknown model 'not_a_model'"),
        ("method", r"--method: Unknown base method 'delta2'"),
        ("layer", r"'stage9' not found in TinyCNN.*deltaft layers"),
        ("alpha", r"--alpha must be >= 0, got -1.0"),
        ("yaml", r"Unknown setting\(s\) 'alpah' \(did you mean 'alpha'\?\)"),
        ("epochs+iterations", r"argument --iterations: not allowed with argument --epochs"),
        ("attention", r"--attention .*attention.safetensors: .*was estimated for model"),
        ("eval", r"No checkpoint at .*best.pt"),
    ],
)
def test_user_errors_exit_2_with_one_line(
    case: str,
    match: str,
    folder: Path,
    bad_data: dict[str, Path],
    delta_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    data = bad_data.get(case, folder)
    extra: list[str] = {
        "model": ["--model", "not_a_model"],
        "method": ["--method", "delta2"],
        "layer": ["--layers", "stage1,stage9"],
        "alpha": ["--alpha", "-1"],
        "yaml": ["--config", str(bad_data["yaml"])],
        "epochs+iterations": ["--iterations", "5"],
        # the attention file of a tiny_cnn run, used with another model
        "attention": ["--model", "tests.toy_models:other_cnn",
                      "--attention", str(delta_run / "attention.safetensors")],
    }.get(case, [])  # fmt: skip
    argv = (
        ["-q", "eval", "--run", str(tmp_path)]
        if case == "eval"
        else ["-q", *_train_args(data, out, *extra)]
    )
    code, stdout, err = run_main(capsys, *argv)
    assert not out.exists()  # nothing is written before the settings are validated
    assert code == 2
    lines = [line for line in err.splitlines() if not line.startswith("deltaft: warning:")]
    assert len(lines) == 1, err
    assert lines[0].startswith("deltaft: error: ")
    assert "Traceback" not in err and stdout == ""
    assert re.search(match, lines[0]), lines[0]


def test_subprocess_entry_point_and_exit_status(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "deltaft", "train", "--data", str(tmp_path), "--model", MODEL,
         "--out", str(tmp_path / "run"), "--alpha", "-0.5"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == "deltaft: error: --alpha must be >= 0, got -0.5.\n"
    assert result.stdout == ""


# ------------------------------------------------------------------------------------------------
# progress output
# ------------------------------------------------------------------------------------------------
def _progress(step: int, steps: int = 5) -> Progress:
    return Progress(
        epoch=1, epochs=2, step=step, steps=steps, metrics={"loss": 1.5, "reg/delta": 0.25,
        "acc": 0.5}, images_per_s=100.0, eta_s=65.0, lr=0.01,
    )  # fmt: skip


def test_plain_progress_lines_every_n_steps() -> None:
    stream = io.StringIO()
    printer = ProgressPrinter(stream, every=2, tty=False)
    for step in range(1, 6):
        printer(_progress(step))
    lines = stream.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == [
        "epoch 1/2 step 2/5",
        "epoch 1/2 step 4/5",
        "epoch 1/2 step 5/5",
    ]
    assert lines[0] == (
        "epoch 1/2 step 2/5 | loss 1.5, reg/delta 0.25, acc 50.0% | 100.0 img/s | lr 0.01 | "
        "ETA 1:05"
    )


def test_terminal_progress_bar_redraws_one_line() -> None:
    stream = io.StringIO()
    printer = ProgressPrinter(stream, tty=True, min_interval=0.0)
    for step in range(1, 6):
        printer(_progress(step))
    text = stream.getvalue()
    # A tqdm bar: every step redraws the same line (carriage returns), one newline at the end.
    assert text.count("\r") >= 5 and text.count("\n") == 1 and text.endswith("\n")
    last = text.rstrip("\n").rsplit("\r", 1)[-1]
    assert last == (
        "epoch 1/2 #################### 5/5 | loss 1.5, reg/delta 0.25, acc 50.0% | 100.0 img/s | "
        "lr 0.01 | ETA 1:05"
    )


def test_log_lines_do_not_break_the_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(logging.INFO)
    printer = ProgressPrinter(tty=True, min_interval=0.0)
    printer(_progress(1))
    logging.getLogger("deltaft.test").warning("look out")
    printer(_progress(2))
    printer.close()  # as main() does before an error line
    err = capsys.readouterr().err
    assert "\ndeltaft: warning: look out\n" in "\n" + err.replace("\r", "\n")
    assert err.endswith("\n")


# ------------------------------------------------------------------------------------------------
# options generated from TrainConfig; exit statuses
# ------------------------------------------------------------------------------------------------
def test_every_setting_is_a_train_flag_generated_from_its_field() -> None:
    import argparse
    import dataclasses
    import typing

    from deltaft.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    train = {a.dest: a for a in sub.choices["train"]._actions}
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        action = train[field.name]
        assert action.option_strings[0] == "--" + field.name.replace("_", "-")
        assert action.default is argparse.SUPPRESS  # defaults come from the dataclass
        hint = hints[field.name]
        if typing.get_origin(hint) is typing.Literal:
            assert tuple(action.choices or ()) == typing.get_args(hint), field.name
        if field.default not in (None, dataclasses.MISSING) and not isinstance(field.default, bool):
            shown = f"{field.default:g}" if isinstance(field.default, float) else field.default
            # "(default 2/3)" and "4/9" read better than 0.666667 and 0.444444
            if field.name not in ("step_at", "lwf_trade_off"):
                assert str(shown) in (action.help or ""), field.name


def test_exit_status_of_each_error() -> None:
    from deltaft.app.errors import SettingError
    from deltaft.cli import exit_status
    from deltaft.engine import NonFiniteLossError

    assert exit_status(SettingError("{lr} must be > 0, got 0.")) == (2, "--lr must be > 0, got 0.")
    assert exit_status(ValueError("bad")) == (2, "bad")
    assert exit_status(FileNotFoundError("Source folder x does not exist")) == (
        2,
        "Source folder x does not exist",
    )
    assert exit_status(FileNotFoundError(2, "No such file or directory", "x")) == (
        1,
        "FileNotFoundError: [Errno 2] No such file or directory: 'x'",
    )
    assert exit_status(NonFiniteLossError("loss is nan")) == (1, "loss is nan")
    assert exit_status(PermissionError(13, "denied")) == (1, "PermissionError: [Errno 13] denied")
    assert exit_status(RuntimeError("a bug")) is None  # a traceback, not a one-liner
