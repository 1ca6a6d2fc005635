"""Data and evaluation faults (issue 12): evaluation counts only what it read, augmentation does
not depend on the worker count, absurd image sizes are skipped, bad settings are one line.

Everything runs on CPU with the toy CNN of ``tests/toy_models.py`` and one torch thread.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import Tensor

from deltaft.app.build import derived_seed, make_loader, verify_data
from deltaft.app.config import TrainConfig
from deltaft.app.data import ImageFolder, build_datasets
from deltaft.app.data.images import MAX_ASPECT_RATIO, load_rgb
from deltaft.app.data.transforms import MAX_IMAGE_SIZE
from deltaft.app.errors import SettingError
from deltaft.app.report import BalanceWarning
from deltaft.engine import evaluate
from tests.cli_support import (  # noqa: F401 (autouse fixtures)
    CLASSES,
    MODEL,
    load_state,
    one_thread,
    raises_rendered,
    restore_logging,
    run_main,
    write_images,
)


def _data(root: Path, *, train: int = 4, val: int = 2, test: int = 2) -> Path:
    for split, n, seed in (("train", train, 0), ("val", val, 1), ("test", test, 2)):
        if n:
            write_images(root, split, n, seed)
    return root


def _train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--threads", "1", "train", "--data", str(data), "--model", MODEL, "--weights", "none",
        "--method", "l2", "--out", str(out), "--image-size", "16", "--batch-size", "4",
        "--epochs", "1", "--workers", "0", "--device", "cpu", *extra,
    ]  # fmt: skip


def _corrupt(path: Path) -> Path:
    path.write_bytes(b"not an image")
    return path


# ------------------------------------------------------------------------------------------------
# Class 3: evaluation counts what it read
# ------------------------------------------------------------------------------------------------
def test_unreadable_test_images_leave_the_evaluated_set(tmp_path: Path) -> None:
    root = _data(tmp_path / "data", test=3)
    bad = [_corrupt(root / "test" / name / "0.png") for name in CLASSES[:2]]
    splits = build_datasets(str(root), image_size=16)
    assert verify_data(splits) == sorted(str(p) for p in bad)
    test = splits.test
    assert isinstance(test, ImageFolder) and len(test) == 4 * 3 - 2
    assert not {str(p) for p in bad} & {path for path, _ in test.samples}
    # each label is the label of its own image: no image stands in for a broken one
    assert [label for _, label in test.samples] == test.targets
    loader = torch.utils.data.DataLoader(test, batch_size=4)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))
    assert evaluate(model, loader, device=torch.device("cpu"))["images"] == 10


def test_an_image_that_breaks_after_start_up_fails_the_evaluation(tmp_path: Path) -> None:
    root = _data(tmp_path / "data")
    splits = build_datasets(str(root), image_size=16)
    verify_data(splits)
    _corrupt(root / "test" / "ant" / "1.png")
    assert splits.test is not None
    with pytest.raises(OSError, match=r"test.ant.1\.png .*could not be read during evaluation"):
        splits.test[1]


@pytest.mark.parametrize("split", ["val", "test"])
def test_a_class_without_readable_evaluation_image_is_refused_at_start_up(
    split: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _data(tmp_path / "data")
    for path in (root / split / "bee").iterdir():
        _corrupt(path)
    out = tmp_path / "run"
    code, _, err = run_main(capsys, *_train_argv(root, out))
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("deltaft: error: Class folder(s) ")
    assert f"bee have no readable image in the {split} split" in last
    assert "Traceback" not in err
    assert not (out / "checkpoints").exists()  # refused before training


def test_run_summary_and_eval_count_the_readable_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _data(tmp_path / "data", test=3)
    bad = [_corrupt(root / "test" / name / "0.png") for name in CLASSES]
    _corrupt(root / "val" / "ant" / "0.png")
    out = tmp_path / "run"
    code, _, err = run_main(capsys, *_train_argv(root, out))
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_images"] == 8 and summary["val_images"] == 7
    assert summary["skipped"]["count"] == 5
    argv = ["eval", "--run", str(out), "--model", MODEL, "--device", "cpu"]  # a factory: named
    code, stdout, err = run_main(capsys, *argv)
    assert code == 0, err
    assert "(8 images;" in stdout
    assert err.count("Skipping unreadable image") == len(bad)


# ------------------------------------------------------------------------------------------------
# Class 5: augmentation does not depend on the worker count
# ------------------------------------------------------------------------------------------------
def _epoch_batches(train: torch.utils.data.Dataset, workers: int, epoch: int) -> list[Tensor]:
    cfg = TrainConfig(data="unused", out="unused", model=MODEL, batch_size=4, workers=workers)
    generator = torch.Generator()
    loader = make_loader(train, cfg, torch.device("cpu"), shuffle=True, generator=generator)
    generator.manual_seed(derived_seed(0, "order", epoch))  # as the epoch loop does
    torch.manual_seed(epoch)  # the main process's RNG must not matter either
    return [x for x, _ in loader]


def test_augmentation_is_the_same_with_any_number_of_workers(tmp_path: Path) -> None:
    splits = build_datasets(str(_data(tmp_path / "data")), image_size=16)
    reference = _epoch_batches(splits.train, 0, 1)
    for workers in (1, 2):
        batches = _epoch_batches(splits.train, workers, 1)
        assert len(batches) == len(reference)
        for got, expected in zip(batches, reference, strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # another epoch draws other crops and flips
    assert not torch.equal(torch.cat(_epoch_batches(splits.train, 0, 2)), torch.cat(reference))


def test_augmentation_leaves_the_main_process_rng_alone(tmp_path: Path) -> None:
    splits = build_datasets(str(_data(tmp_path / "data")), image_size=16)
    _epoch_batches(splits.train, 0, 1)
    state = torch.get_rng_state()
    cfg = TrainConfig(data="unused", out="unused", model=MODEL, batch_size=4, workers=0)
    loader = make_loader(splits.train, cfg, torch.device("cpu"), shuffle=True,
                         generator=torch.Generator().manual_seed(3))  # fmt: skip
    list(loader)
    after = torch.get_rng_state()
    # the loader draws its base seed from its own generator; the transforms draw nothing here
    assert torch.equal(state, after)


def test_training_with_zero_or_two_workers_gives_the_same_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _data(tmp_path / "data")
    weights = []
    for workers in (0, 2):
        out = tmp_path / f"run{workers}"
        argv = _train_argv(root, out, "--epochs", "2", "--workers", str(workers))
        code, _, err = run_main(capsys, *argv)
        assert code == 0, err
        weights.append(load_state(out / "checkpoints" / "last.pt")["model"])
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=0, atol=0, msg=key)


# ------------------------------------------------------------------------------------------------
# Class 11: absurd image sizes are skipped; --image-size has an upper bound
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(1, 2000), (3000, 2)])
def test_an_extreme_aspect_ratio_is_skipped_like_a_broken_file(
    size: tuple[int, int], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _data(tmp_path / "data")
    odd = root / "train" / "ant" / "strip.png"
    Image.new("RGB", size, (90, 90, 90)).save(odd)
    splits = build_datasets(str(root), image_size=16)
    with caplog.at_level(logging.WARNING, logger="deltaft"):
        assert verify_data(splits) == [str(odd)]
    [message] = [r.getMessage() for r in caplog.records if "Skipping" in r.getMessage()]
    assert f"Skipping unreadable image {odd}" in message
    assert f"{size[0]}x{size[1]} pixels" in message and f"beyond {MAX_ASPECT_RATIO}:1" in message
    assert len(splits.train) == 16  # type: ignore[arg-type]


def test_the_largest_allowed_aspect_ratio_is_read(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    Image.new("RGB", (2 * MAX_ASPECT_RATIO, 2), (90, 90, 90)).save(path)
    assert load_rgb(str(path)).size == (2 * MAX_ASPECT_RATIO, 2)


def test_image_size_has_an_upper_bound(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with raises_rendered(SettingError, rf"--image-size must be <= {MAX_IMAGE_SIZE}, got 100000"):
        TrainConfig(data="d", out="o", model=MODEL, image_size=100_000)
    with raises_rendered(SettingError, "--image-size must be <= "):
        build_datasets(str(_data(tmp_path / "data")), image_size=MAX_IMAGE_SIZE + 1)
    TrainConfig(data="d", out="o", model=MODEL, image_size=MAX_IMAGE_SIZE)
    argv = _train_argv(tmp_path, tmp_path / "run", "--image-size", "99999")
    code, _, err = run_main(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and f"--image-size must be <= {MAX_IMAGE_SIZE}" in err


# ------------------------------------------------------------------------------------------------
# Class 12: settings out of range are one line with exit status 2
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["top", "subcommand"])
@pytest.mark.parametrize("threads", ["0", "-1"])
def test_threads_below_one_is_refused(
    where: str, threads: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["layers", "--model", MODEL]
    argv = ["--threads", threads, *argv] if where == "top" else [*argv, "--threads", threads]
    threads_before = torch.get_num_threads()
    code, _, err = run_main(capsys, *argv)
    assert code == 2
    assert err == f"deltaft: error: --threads must be >= 1, got {threads}.\n"
    assert torch.get_num_threads() == threads_before


@pytest.mark.parametrize("seed", [-1, 2**63, 2**64])
def test_a_seed_out_of_range_names_the_flag(
    seed: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with raises_rendered(SettingError, rf"--seed must be in \[0, 2\*\*63 - 1\], got {seed}"):
        TrainConfig(data="d", out="o", model=MODEL, seed=seed)
    code, _, err = run_main(capsys, *_train_argv(tmp_path, tmp_path / "run", "--seed", str(seed)))
    assert code == 2 and err.count("\n") == 1 and "--seed must be in [0, 2**63 - 1]" in err
    TrainConfig(data="d", out="o", model=MODEL, seed=2**63 - 1)


def test_fewer_than_two_classes_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "data"
    write_images(root, "train", 3, 0)
    for name in CLASSES[1:]:
        shutil.rmtree(root / "train" / name)
    with pytest.raises(ValueError, match=r"has 1 class \(ant\); .* at least 2 classes"):
        build_datasets(str(root), image_size=16)
    code, _, err = run_main(capsys, *_train_argv(root, tmp_path / "run"))
    assert code == 2 and "at least 2 classes" in err.splitlines()[-1]


def test_the_attention_loader_drops_a_final_batch_of_one(tmp_path: Path) -> None:
    splits = build_datasets(str(_data(tmp_path / "data", train=3)), image_size=16)  # 12 images
    cfg = TrainConfig(data="d", out="o", model=MODEL, batch_size=11, workers=0)
    generator = torch.Generator().manual_seed(0)
    loader = make_loader(splits.train, cfg, torch.device("cpu"), shuffle=True, generator=generator)
    assert [len(y) for _, y in loader] == [11]
    for n in (10, 12):  # a final batch of 2 is kept, as is every image of an evaluation loader
        cfg = TrainConfig(data="d", out="o", model=MODEL, batch_size=n, workers=0)
        loader = make_loader(splits.train, cfg, torch.device("cpu"), shuffle=True,
                             generator=generator)  # fmt: skip
        assert sum(len(y) for _, y in loader) == 12
    cfg = TrainConfig(data="d", out="o", model=MODEL, batch_size=11, workers=0)
    assert splits.test is not None
    loader = make_loader(splits.test, cfg, torch.device("cpu"), shuffle=False)
    assert sum(len(y) for _, y in loader) == 8


# ------------------------------------------------------------------------------------------------
# Class 14: warnings a user can act on
# ------------------------------------------------------------------------------------------------
def test_the_balance_warning_fires_only_when_the_task_loss_stops_falling(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = TrainConfig(data="d", out="o", model=MODEL, alpha=0.5)
    balance = BalanceWarning(cfg)

    def epoch(n: int, task: float, reg: float) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="deltaft"):
            assert balance(n, {"task_loss": task, "reg/delta": reg}) == pytest.approx(reg / task)
        return [r.getMessage() for r in caplog.records]

    assert epoch(1, 1.0, 50.0) == []  # a large ratio alone predicts nothing
    assert epoch(2, 0.8, 50.0) == []  # the task loss falls: the regularizer does no harm
    assert epoch(3, 0.9, 5.0) == []  # stalled, but the regularizer does not dominate
    [message] = epoch(4, 0.95, 50.0)
    assert message.startswith(
        "epoch 4: the task loss stopped falling (0.9 -> 0.95) while the regularizer is 52.6 "
        "times it: --alpha 0.5 (--beta "
    )
    assert "try --alpha 0.05." in message
    assert epoch(5, 1.0, 50.0) == []  # once per run


def test_a_non_finite_evaluation_loss_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    class Overflowing(torch.nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            logits = torch.zeros(x.shape[0], 3)
            logits[0, 1] = float("inf")
            return logits

    batches = [(torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]))]
    with caplog.at_level(logging.WARNING, logger="deltaft"):
        metrics = evaluate(Overflowing(), batches, device=torch.device("cpu"))
    assert metrics["images"] == 2
    [message] = [r.getMessage() for r in caplog.records]
    assert message.startswith("The evaluation loss is nan over 2 images:")
    with caplog.at_level(logging.WARNING, logger="deltaft"):
        caplog.clear()
        evaluate(torch.nn.Flatten(), [(torch.zeros(2, 3), torch.tensor([0, 1]))],
                 device=torch.device("cpu"))  # fmt: skip
    assert not caplog.records
