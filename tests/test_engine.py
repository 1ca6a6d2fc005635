from __future__ import annotations

import copy
import json
import math
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from deltaft import TransferObjective
from deltaft.app.checkpoint import capture_rng_state, restore_rng_state
from deltaft.app.errors import SettingError
from deltaft.app.tracking import RunDir, load_checkpoint, save_checkpoint
from deltaft.engine import NonFiniteLossError, Progress, evaluate, train_one_epoch
from tests.conftest import TinyNet

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """Tiny tensors: one thread avoids OpenMP contention on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _loader(n: int = 12, batch: int = 4, classes: int = 4) -> DataLoader[Any]:
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, 16, 16, generator=gen), torch.arange(n) % classes)
    return DataLoader(data, batch_size=batch)


def _objective(method: str = "delta") -> TransferObjective:
    torch.manual_seed(0)
    source = TinyNet(num_classes=5)
    model = copy.deepcopy(source)
    model.fc = nn.Linear(16, 4)
    layers = ["conv1", "conv2"] if method in ("fm", "delta") else None
    attention = "uniform" if method == "delta" else None
    return TransferObjective(model, source, method, layers=layers, attention=attention)  # type: ignore[arg-type]


class _CustomObjective(nn.Module):
    """Not a TransferObjective: any loss parts, to check the loop only reads the dict."""

    def __init__(self, bad_step: int | None = None) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4))
        self.bad_step = bad_step
        self.calls = 0

    def forward(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        self.calls += 1
        logits = self.model(x)
        task = F.cross_entropy(logits, y)
        extra = self.model[1].weight.pow(2).sum() * 1e-3
        if self.calls == self.bad_step:
            extra = extra * math.inf
        return {"loss": task + extra, "logits": logits, "task_loss": task, "reg/custom": extra}


@pytest.mark.parametrize("method", ["l2", "l2sp", "fm", "delta"])
def test_train_one_epoch_logs_every_part_the_objective_returns(method: str) -> None:
    objective = _objective(method)
    optimizer = torch.optim.SGD(objective.param_groups(lr=0.1), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    seen: list[Progress] = []
    metrics = train_one_epoch(
        objective, _loader(), optimizer, scheduler, device=CPU, progress=seen.append, epochs=3
    )
    parts = {"loss", "task_loss"} | ({"reg/head"} if method != "l2" else set())
    parts |= {"l2sp": {"reg/l2sp"}, "fm": {"reg/fm"}, "delta": {"reg/delta"}}.get(method, set())
    assert parts | {"acc", "lr", "steps", "images", "seconds", "images_per_s"} == set(metrics)
    assert metrics["steps"] == 3 and metrics["images"] == 12
    assert 0.0 <= metrics["acc"] <= 1.0
    assert metrics["lr"] == pytest.approx(0.025)  # the lr of the last step, stepped per batch
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0125)
    assert [(p.epoch, p.epochs, p.step, p.steps) for p in seen] == [(1, 3, s, 3) for s in (1, 2, 3)]
    assert set(seen[-1].metrics) == parts | {"acc"}
    assert seen[-1].metrics["loss"] == pytest.approx(metrics["loss"])


def test_loop_never_depends_on_the_method_and_honours_max_steps() -> None:
    objective = _CustomObjective()
    optimizer = torch.optim.SGD(objective.parameters(), lr=0.1)
    metrics = train_one_epoch(objective, _loader(), optimizer, device=CPU, max_steps=2)
    assert {"reg/custom", "task_loss", "loss", "acc"} <= set(metrics)
    assert metrics["steps"] == 2 and objective.calls == 2


def test_non_finite_loss_names_the_part_and_the_step() -> None:
    objective = _CustomObjective(bad_step=2)
    before = copy.deepcopy(objective.state_dict())
    optimizer = torch.optim.SGD(objective.parameters(), lr=0.1)
    with pytest.raises(
        NonFiniteLossError, match=r"Non-finite reg/custom at epoch 3, step 2/3 \(loss=inf, "
    ):
        train_one_epoch(objective, _loader(), optimizer, device=CPU, epoch=3, epochs=4)
    weight = objective.model[1].weight
    assert torch.isfinite(weight).all()  # the bad step was not applied
    assert not torch.equal(weight, before["model.1.weight"])  # the first one was


def test_empty_loader_is_an_error() -> None:
    objective = _CustomObjective()
    optimizer = torch.optim.SGD(objective.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="yielded no batch"):
        train_one_epoch(objective, [], optimizer, device=CPU)


def test_evaluate_counts_top1_and_restores_the_mode() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4)).train()
    loader = _loader(n=10, batch=3)
    metrics = evaluate(model, loader, device=CPU)
    x, y = loader.dataset.tensors  # type: ignore[attr-defined]
    with torch.no_grad():
        logits = model(x)
    assert metrics["images"] == 10
    assert metrics["acc"] == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert metrics["loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
    assert model.training


def test_distributed_reduce_sums_counts() -> None:
    """With a reduce function the metrics combine every process's sums (here: 2 equal ones)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4))
    alone = evaluate(model, _loader(), device=CPU)
    doubled = evaluate(model, _loader(), device=CPU, reduce=lambda t: 2 * t)
    assert doubled["images"] == 2 * alone["images"]
    assert doubled["acc"] == pytest.approx(alone["acc"])


# ------------------------------------------------------------------------------------------------
# tracking
# ------------------------------------------------------------------------------------------------
def test_rng_state_survives_a_weights_only_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # a cached gaussian in the numpy state
    state = capture_rng_state()
    expected = (random.random(), np.random.standard_normal(), torch.rand(3))
    path = save_checkpoint({"rng": state, "model": {"w": torch.ones(2)}}, tmp_path / "c.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left
    loaded = torch.load(path, weights_only=True)  # plain values and tensors only
    restore_rng_state(loaded["rng"])
    got = (random.random(), np.random.standard_normal(), torch.rand(3))
    assert got[:2] == expected[:2]
    assert torch.equal(got[2], expected[2])


def test_checkpoint_write_is_atomic(tmp_path: Path) -> None:
    path = save_checkpoint({"epoch": 1}, tmp_path / "last.pt")

    class Unpicklable:
        def __reduce__(self) -> Any:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint({"epoch": 2, "bad": Unpicklable()}, path)
    assert load_checkpoint(path)["epoch"] == 1  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_load_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="No checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a deltaft checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_run_dir_refuses_to_overwrite(tmp_path: Path) -> None:
    RunDir(tmp_path / "new").check_new()  # missing: fine
    (tmp_path / "empty").mkdir()
    RunDir(tmp_path / "empty").check_new()  # empty: fine
    run = RunDir(tmp_path / "run")
    run.write_config("a: 1\n")
    with pytest.raises(
        SettingError, match="already holds a run; use resume .* or choose a new out"
    ) as holds:
        run.check_new()
    flags = holds.value.render(lambda key: f"--{key}")
    assert re.search("already holds a run; use --resume .* or choose a new --out", flags)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(SettingError, match="non-empty directory"):
        RunDir(tmp_path / "mine").check_new()
    (tmp_path / "file").write_text("x")
    with pytest.raises(SettingError, match="is a file"):
        RunDir(tmp_path / "file").check_new()


def test_metrics_lines_and_reset(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.append_metrics({"epoch": 1, "val/acc": 0.5, "nan": float("nan")})
    run.append_metrics({"epoch": 2})
    assert run.read_metrics() == [{"epoch": 1, "val/acc": 0.5, "nan": None}, {"epoch": 2}]
    run.reset_metrics([{"epoch": 1}])
    assert run.read_metrics() == [{"epoch": 1}]
    run.write_summary({"acc": torch.tensor(0.25), "path": tmp_path})
    assert json.loads(run.summary_path.read_text()) == {"acc": 0.25, "path": str(tmp_path)}


def test_non_writing_rank_writes_nothing(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "r", write=False)
    run.write_config("a: 1\n")
    run.append_metrics({"epoch": 1})
    run.save_checkpoint({"epoch": 1})
    run.write_summary({})
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------------
# settings named in errors (the CLI renders them as flags)
# ------------------------------------------------------------------------------------------------
def _as_flags(error: SettingError) -> str:
    return error.render(lambda key: "--" + key.replace("_", "-"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_unavailable_device_names_the_device_setting() -> None:
    from deltaft.app.build import resolve_device

    with pytest.raises(SettingError, match="device cuda: CUDA is not available") as raised:
        resolve_device("cuda")
    assert _as_flags(raised.value) == (
        "--device cuda: CUDA is not available here; use --device cpu."
    )


def test_eval_of_a_missing_run_names_the_run_setting(tmp_path: Path) -> None:
    from deltaft.app.evaluate import evaluate_checkpoint

    with pytest.raises(SettingError, match="run .*missing is not a directory") as raised:
        evaluate_checkpoint(tmp_path / "missing")
    assert _as_flags(raised.value).startswith(f"--run {tmp_path / 'missing'} is not a directory")
    with pytest.raises(FileNotFoundError, match=r"No checkpoint at .*best\.pt"):
        evaluate_checkpoint(tmp_path)
