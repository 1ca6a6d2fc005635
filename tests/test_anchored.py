"""Base methods cotuning, lwf and spd (issue 14): the kept source head's terms against naive
references, the relationship of a run against a per-image loop, the SPD optimizer of a run, and
exact resume after a stop for all three. Toy models, generated images, CPU, one thread."""

from __future__ import annotations

import copy
import itertools
import json
import logging
import signal
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from deltaft.app import anchored
from deltaft.app.build import build_run
from deltaft.app.compare import run_compare
from deltaft.app.config import TrainConfig
from deltaft.app.data.transforms import eval_transform
from deltaft.app.errors import SettingError
from deltaft.cotuning import estimate_relationship
from deltaft.objective import TransferObjective
from deltaft.optim import SGDSPD, AdamSPD
from deltaft.regularizers.source_head import CoTuningRegularizer, LwFRegularizer
from tests.cli_support import (  # noqa: F401 (autouse fixtures)
    MODEL,
    load_state,
    one_thread,
    restore_logging,
    run_main,
    write_images,
)
from tests.conftest import TinyNet

K_SOURCE = 4  # TinyNet's head: the "source classes"


# ------------------------------------------------------------------------------------------------
# The objective's terms against naive references
# ------------------------------------------------------------------------------------------------
def _pair(num_target: int = 3) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    source = TinyNet(num_classes=K_SOURCE)
    for p in source.parameters():  # move the BN affine params off (1, 0): a real source
        p.data.add_(0.1 * torch.randn_like(p))
    model = copy.deepcopy(source)
    model.fc = nn.Linear(16, num_target)
    return source, model


def _student_logits(model: nn.Module, kept: nn.Module, x: Tensor) -> Tensor:
    """The reference student: a copy of the model whose head is the kept source head."""
    student = copy.deepcopy(model)
    student.fc = copy.deepcopy(kept)
    return student.train()(x)


def _naive_kl(student: Tensor, teacher: Tensor, t: float) -> Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for b in range(student.shape[0]):
        p = torch.softmax(teacher[b].double() / t, 0)
        q = torch.softmax(student[b].double() / t, 0)
        total += (p * (p.log() - q.log())).sum()
    return t**2 * total / student.shape[0]


def test_lwf_term_gradients_and_groups_against_naive_references() -> None:
    source, model = _pair()
    x, y = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    objective = TransferObjective(
        model, source, "lwf", alpha=0.7, lwf_temperature=2.5, weight_decay=3e-4
    )
    assert objective.source.layers == ["fc"]  # the teacher runs whole, to its logits
    kept = objective.kept_head
    assert isinstance(kept, nn.Linear) and kept.out_features == K_SOURCE
    assert torch.equal(kept.weight, source.fc.weight) and kept.weight.requires_grad
    # Perturb the kept head so the penalty is far from 0.
    with torch.no_grad():
        kept.weight.add_(0.5 * torch.randn_like(kept.weight))
    student = _student_logits(model, kept, x)
    teacher = source.eval()(x)
    out = objective(x, y)
    assert list(out) == ["logits", "task_loss", "reg/lwf", "loss"]  # no reg/head: weight decay
    want = 0.7 * _naive_kl(student, teacher, 2.5)
    torch.testing.assert_close(out["reg/lwf"].double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], out["task_loss"] + out["reg/lwf"])
    # Gradient of the penalty w.r.t. the student's logits: alpha * T / B * (q - p).
    z = student.detach().requires_grad_(True)
    (0.7 * LwFRegularizer(nn.Identity(), 2.5)(z, teacher)).backward()
    q, p = torch.softmax(z.detach() / 2.5, 1), torch.softmax(teacher / 2.5, 1)
    torch.testing.assert_close(z.grad, 0.7 * 2.5 / 6 * (q - p), rtol=1e-5, atol=1e-7)
    # The penalty trains the kept head and the backbone, not the new head.
    out["reg/lwf"].backward()
    assert kept.weight.grad is not None and kept.weight.grad.abs().sum() > 0
    assert model.fc.weight.grad is None
    assert model.conv1.weight.grad is not None
    assert not any(p.requires_grad for p in objective.source.parameters())
    groups = objective.param_groups(lr=0.1, head_lr=1.0)
    assert [(g["name"], g["weight_decay"], g["lr"]) for g in groups] == [
        ("backbone", 3e-4, 0.1),
        ("head", 3e-4, 1.0),
        ("source_head", 3e-4, 0.1),
    ]
    assert groups[2]["params"] == [kept.weight, kept.bias]
    # Predictions are the new head's only.
    assert objective.model.eval()(x).shape == (6, 3)


def test_cotuning_term_against_the_naive_cross_entropy() -> None:
    source, model = _pair()
    x, y = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    r = torch.softmax(torch.randn(3, K_SOURCE, dtype=torch.float64), 1)
    objective = TransferObjective(model, source, "cotuning", alpha=2.3, relationship=r)
    assert objective.source.layers == []  # no frozen forward
    kept = objective.kept_head
    assert kept is not None
    student = _student_logits(model, kept, x)
    out = objective(x, y)
    assert list(out) == ["logits", "task_loss", "reg/cotuning", "loss"]
    naive = -sum((r[y[b]] * torch.log_softmax(student[b].double(), 0)).sum() for b in range(6))
    torch.testing.assert_close(out["reg/cotuning"].double(), 2.3 * naive / 6, rtol=1e-5, atol=1e-6)
    assert objective.terms["reg/cotuning"].relationship.dtype == torch.float32  # a buffer
    assert "terms.reg/cotuning.relationship" in objective.state_dict()


def test_kept_head_errors_are_one_clear_line() -> None:
    source, model = _pair()
    r = torch.full((3, K_SOURCE), 1 / K_SOURCE)
    with pytest.raises(ValueError, match="needs the category relationship"):
        TransferObjective(model, source, "cotuning")
    with pytest.raises(ValueError, match="only used by method 'cotuning', not 'lwf'"):
        TransferObjective(model, source, "lwf", relationship=r)
    with pytest.raises(ValueError, match="layers are only used by methods 'fm' and 'delta'"):
        TransferObjective(model, source, "lwf", layers=["conv1"])
    with pytest.raises(ValueError, match="sum to 1"):
        CoTuningRegularizer(nn.Linear(2, K_SOURCE), 2 * r)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        LwFRegularizer(nn.Linear(2, 2), 0.0)
    headless = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="No nn.Linear classifier head found"):
        TransferObjective(copy.deepcopy(headless), headless, "lwf")
    other = nn.Sequential(nn.Flatten(), nn.Linear(768, 3))  # the source lacks the head "fc"
    with pytest.raises(ValueError, match="source network has no module 'fc'"):
        TransferObjective(model, other, "cotuning", relationship=r)
    with pytest.raises(ValueError, match="relationship's 4 source classes|must match"):
        bad = torch.full((3, 5), 0.2)
        TransferObjective(model, source, "cotuning", relationship=bad)(
            torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
        )


# ------------------------------------------------------------------------------------------------
# Application pieces
# ------------------------------------------------------------------------------------------------
def test_held_out_split_is_stratified_seeded_and_refuses_single_images() -> None:
    labels = torch.tensor([0] * 10 + [1] * 2 + [2] * 5)
    fit, held = anchored.held_out_split(labels, 3, seed=4)
    assert sorted(fit.tolist() + held.tolist()) == list(range(len(labels)))
    assert [int((labels[held] == c).sum()) for c in range(3)] == [2, 1, 1]
    assert torch.equal(held, anchored.held_out_split(labels, 3, seed=4)[1])
    assert not torch.equal(held, anchored.held_out_split(labels, 3, seed=5)[1])
    with pytest.raises(SettingError, match="class 1 has 1 training image"):
        anchored.held_out_split(torch.tensor([0, 0, 1]), 2, seed=0)


def test_the_methods_settings_are_checked() -> None:  # their warning: test_methods.py
    with pytest.raises(SettingError, match="lwf_temperature"):
        TrainConfig(data="d", model="m", out="o", lwf_temperature=float("inf"))
    with pytest.raises(SettingError, match="spd_lambda"):
        TrainConfig(data="d", model="m", out="o", spd_lambda=-1.0)


def test_spd_optimizer_anchors_every_tensor_at_its_start_as_the_authors() -> None:
    source, model = _pair()
    objective = TransferObjective(model, source, "l2", weight_decay=0.0)
    for name, kind in (("sgd", SGDSPD), ("adamw", AdamSPD)):
        cfg = TrainConfig(data="d", model="m", out="o", method="spd", optimizer=name)
        opt = anchored.spd_optimizer(cfg, objective.param_groups(lr=0.1))
        assert isinstance(opt, kind)
        assert [(g["name"], g["anchor"], g["weight_decay"]) for g in opt.param_groups] == [
            ("backbone", True, 1.0),
            ("head", True, 1.0),
        ]
        assert torch.equal(opt.state[model.conv1.weight]["anchor"], source.conv1.weight)
        assert torch.equal(opt.state[model.fc.weight]["anchor"], model.fc.weight)
        assert opt.state[model.fc.weight]["anchor"] is not model.fc.weight  # a copy


# ------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes, 5 training images each (5 steps of 4 per epoch) and 1 test image each."""
    root = tmp_path_factory.mktemp("data")
    for split, n, seed in (("train", 5, 0), ("test", 1, 2)):
        write_images(root, split, n, seed)
    return root


def _argv(data: Path, out: Path, method: str, *extra: str) -> list[str]:
    return [
        "--threads", "1", "train", "--data", str(data), "--model", MODEL, "--weights", "none",
        "--method", method, "--out", str(out), "--image-size", "32", "--batch-size", "4",
        "--epochs", "2", "--workers", "0", "--device", "cpu", *extra,
    ]  # fmt: skip


def _naive_direct_relationship(data: Path, out: Path) -> Tensor:
    """Per image: the source's softmax on the evaluation transform, averaged per class."""
    cfg = TrainConfig(data=str(data), model=MODEL, out=str(out), weights="none", image_size=32)
    built = build_run(cfg, torch.device("cpu"))
    transform = eval_transform(32, "default", built.info.mean, built.info.std)
    train = built.splits.train
    sums = torch.zeros(4, 1000, dtype=torch.float64)
    counts = torch.zeros(4)
    source = built.source.eval()
    for path, label in train.samples:  # type: ignore[attr-defined]
        from PIL import Image

        x = transform(Image.open(path).convert("RGB"))[None]
        with torch.no_grad():
            sums[label] += torch.softmax(source(x).double(), 1)[0]
        counts[label] += 1
    return sums / counts[:, None].double()


@pytest.mark.slow
def test_cotuning_run_relationship_matches_a_per_image_loop_and_is_checked_on_resume(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "direct"
    code, _, err = run_main(
        capsys, *_argv(data, out, "cotuning", "--cotuning-relationship", "direct")
    )
    assert code == 0, err
    saved = load_state(out / "relationship.pt")
    assert saved["method"] == "direct"
    torch.testing.assert_close(
        saved["relationship"].double(), _naive_direct_relationship(data, out), atol=1e-5, rtol=1e-4
    )
    last = load_state(out / "checkpoints" / "last.pt")
    assert set(last["extra"]["kept_head"]) == {"weight", "bias"}
    assert "extra" not in load_state(out / "checkpoints" / "best.pt")
    # A changed relationship file is refused on resume.
    torch.save({**saved, "relationship": saved["relationship"].flip(0)}, out / "relationship.pt")
    code, _, err = run_main(
        capsys,
        *_argv(data, out, "cotuning", "--cotuning-relationship", "direct"),
        "--resume",
    )
    assert code == 2
    assert "relationship.pt, the Co-Tuning relationship" in err and "is not the file" in err


def test_reverse_relationship_without_validation_fits_on_held_out_training_images(
    data: Path, tmp_path: Path
) -> None:
    cfg = TrainConfig(
        data=str(data), model=MODEL, out=str(tmp_path), weights="none", image_size=32,
        method="cotuning", workers=0,
    )  # fmt: skip
    built = build_run(cfg, torch.device("cpu"))
    got = anchored.estimate_run_relationship(cfg, built)
    transform = eval_transform(32, "default", built.info.mean, built.info.std)
    train = anchored._with_transform(built.splits.train, transform)
    logits, labels = anchored._source_logits(cfg, built, train)
    fit, held = anchored.held_out_split(labels, 4, cfg.seed)
    want = estimate_relationship(
        logits[fit], labels[fit], 4, "reverse", val_logits=logits[held], val_labels=labels[held]
    )
    torch.testing.assert_close(got, want.float())
    torch.testing.assert_close(got.sum(1), torch.ones(4))


def _stop_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Press Ctrl-C during the given training step (counted from 1)."""
    counter = itertools.count(1)
    original = TransferObjective.forward

    def interrupted(self: TransferObjective, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        if next(counter) == step:
            signal.raise_signal(signal.SIGINT)
        return original(self, x, y)

    monkeypatch.setattr(TransferObjective, "forward", interrupted)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "extra"),
    [("spd", ()), ("spd", ("--optimizer", "adamw", "--lr", "0.001")), ("lwf", ()),
     ("cotuning", ())],
)  # fmt: skip
def test_stop_and_resume_equals_the_uninterrupted_run(
    method: str,
    extra: tuple[str, ...],
    data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    straight, out = tmp_path / "straight", tmp_path / "run"
    code, _, err = run_main(capsys, *_argv(data, straight, method, *extra))
    assert code == 0, err
    _stop_at(monkeypatch, 7)  # epoch 2, step 2
    code, _, err = run_main(capsys, *_argv(data, out, method, *extra))
    assert code == 130, err
    monkeypatch.undo()
    code, _, err = run_main(capsys, *_argv(data, out, method, *extra), "--resume")
    assert code == 0, err
    got, want = (load_state(r / "checkpoints" / "last.pt") for r in (out, straight))
    for key, value in want["model"].items():
        assert torch.equal(got["model"][key], value), key
    for key, value in want.get("extra", {}).get("kept_head", {}).items():
        assert torch.equal(got["extra"]["kept_head"][key], value), key
    for p_got, p_want in zip(
        got["optimizer"]["state"].values(), want["optimizer"]["state"].values(), strict=True
    ):
        for key, value in p_want.items():
            assert torch.equal(torch.as_tensor(p_got[key]), torch.as_tensor(value)), key
    # The source did change the model (an anchored run that does not train proves nothing).
    first = load_state(straight / "checkpoints" / "best.pt")
    assert first["epoch"] == 2
    metrics = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["train/loss"] != metrics[1]["train/loss"]


@pytest.mark.slow
def test_compare_trains_cotuning_lwf_and_spd(data: Path, tmp_path: Path) -> None:
    base = TrainConfig(
        data=str(data), model=MODEL, out=str(tmp_path / "unused"), weights="none",
        image_size=32, batch_size=4, epochs=1, workers=0, device="cpu",
    )  # fmt: skip
    result = run_compare(base, ["cotuning", "lwf", "spd"], 1, tmp_path / "cmp")
    assert [row.method for row in result.rows] == ["cotuning", "lwf", "spd"]
    for method, part in (("cotuning", "reg/cotuning"), ("lwf", "reg/lwf"), ("spd", None)):
        run = tmp_path / "cmp" / f"{method}-seed0"
        row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
        parts = {key for key in row if key.startswith("train/reg/")}
        assert parts == ({f"train/{part}"} if part else set()), method
    assert (tmp_path / "cmp" / "cotuning-seed0" / "relationship.pt").is_file()


def test_the_balance_warning_names_lwf_strength_and_skips_cotuning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Co-Tuning's loss has a floor (the relationship's entropy, about log K): no warning."""
    from deltaft.app.report import BalanceWarning

    for method, want in (("lwf", "--lwf-trade-off 2 holds"), ("cotuning", None)):
        balance = BalanceWarning(
            TrainConfig(data="d", model="m", out="o", method=method, lwf_trade_off=2.0)
        )
        with caplog.at_level(logging.WARNING, logger="deltaft"):
            caplog.clear()
            for n, task in ((1, 0.9), (2, 0.95)):
                balance(n, {"task_loss": task, f"reg/{method}": 50.0})
        messages = [r.getMessage() for r in caplog.records]
        if want is None:
            assert messages == []
        else:
            [message] = messages
            assert want in message and "try --lwf-trade-off 0.2." in message
