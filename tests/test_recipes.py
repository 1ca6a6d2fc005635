"""Recipes of a method spec wired into train, compare and the config (issue 13): +bss, +lpft, +wise.

Everything runs on CPU with the toy CNN of ``tests/toy_models.py``, 32-pixel images and one
torch thread.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from deltaft.app import recipes
from deltaft.app.build import build_run
from deltaft.app.compare import run_compare
from deltaft.app.config import TrainConfig, load_config
from deltaft.app.config_io import coerce
from deltaft.app.errors import SettingError
from deltaft.app.evaluate import evaluate_checkpoint
from deltaft.app.train import run_training
from deltaft.engine import Progress, TrainingInterrupted
from tests.cli_support import (  # noqa: F401 (autouse fixtures)
    CLASSES,
    MODEL,
    load_state,
    one_thread,
    restore_logging,
    run_main,
    write_images,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes: 4 train images each (4 steps of 4 per epoch), 2 val and 2 test images each."""
    root = tmp_path_factory.mktemp("data")
    for split, n, seed in (("train", 4, 0), ("val", 2, 1), ("test", 2, 2)):
        write_images(root, split, n, seed)
    return root


def _cfg(data: Path, out: Path, method: str, **settings: Any) -> TrainConfig:
    values: dict[str, Any] = {
        "data": str(data), "model": MODEL, "out": str(out), "weights": "none", "method": method,
        "image_size": 32, "batch_size": 4, "epochs": 1, "attention_epochs": 1,
        "attention_batches": 2, "lp_epochs": 1, "workers": 0, "device": "cpu",
        "wise_bn_batches": 2,
    }  # fmt: skip
    return TrainConfig(**{**values, **settings})


def _rows(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------
def test_wise_alphas_from_flags_and_yaml(tmp_path: Path) -> None:
    assert coerce("wise_alphas", " 0, 0.5,1", list[float]) == [0.0, 0.5, 1.0]
    assert coerce("wise_alphas", [0, 1], list[float]) == [0.0, 1.0]
    assert coerce("wise_alphas", "1e-1", list[float]) == [0.1]
    (tmp_path / "c.yaml").write_text("wise_alphas: [0, 0.5]\nbss-eta: 1e-2\n")
    cfg = TrainConfig.from_sources(load_config(tmp_path / "c.yaml"), _required(tmp_path))
    assert (cfg.wise_alphas, cfg.bss_eta) == ([0.0, 0.5], 0.01)
    default = TrainConfig(**_required(tmp_path))
    assert default.wise_alphas == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert (default.bss_eta, default.bss_k, default.lp_epochs, default.lp_lr) == (
        0.001,
        1,
        10,
        0.01,
    )
    assert yaml.safe_load(default.to_yaml())["wise_alphas"] == default.wise_alphas
    assert TrainConfig(**_required(tmp_path)).wise_alphas is not default.wise_alphas  # no sharing


def _required(tmp_path: Path) -> dict[str, str]:
    return {"data": str(tmp_path), "model": MODEL, "out": str(tmp_path / "run")}


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("wise_alphas", "a,b", r"wise_alphas must be numbers like 0,0.5,1, got 'a,b'"),
        ("wise_alphas", [0.5, 1.5], r"wise_alphas must be in \[0, 1\], got 1.5"),
        ("wise_alphas", "0.5,0.5", r"wise_alphas must be distinct, got \[0.5, 0.5\]"),
        ("wise_alphas", [], r"wise_alphas must name at least one"),
        ("wise_alphas", {"a": 1}, r"wise_alphas must be a list of numbers"),
        ("bss_eta", -1.0, r"bss_eta must be >= 0"),
        ("bss_k", 0, r"bss_k must be >= 1"),
        ("lp_epochs", 0, r"lp_epochs must be >= 1"),
        ("lp_lr", 0.0, r"lp_lr must be > 0"),
        ("wise_bn_batches", 0, r"wise_bn_batches must be >= 1"),
    ],
)
def test_recipe_setting_errors(tmp_path: Path, name: str, value: object, match: str) -> None:
    with pytest.raises(SettingError, match=match):
        TrainConfig(**_required(tmp_path), **{name: value})


def test_bad_alpha_on_the_command_line_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_main(
        capsys, "train", "--data", str(tmp_path), "--model", MODEL, "--out", str(tmp_path / "r"),
        "--method", "l2+wise", "--wise-alphas", "0,2",
    )  # fmt: skip
    assert code == 2
    assert err == "deltaft: error: --wise-alphas must be in [0, 1], got 2.0.\n"


# ------------------------------------------------------------------------------------------------
# +bss
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["l2+bss"])  # delta+bss: in the compare test
def test_bss_trains_end_to_end_and_its_term_is_in_the_loss(
    data: Path, tmp_path: Path, method: str
) -> None:
    summary = run_training(_cfg(data, tmp_path / "run", method, bss_eta=0.01, bss_k=2))
    assert summary["method"] == method
    (row,) = _rows(tmp_path / "run")
    assert row["train/reg/bss"] > 0
    parts = sum(v for k, v in row.items() if k.startswith("train/reg/"))
    assert row["train/loss"] == pytest.approx(row["train/task_loss"] + parts, rel=1e-5)
    if method == "l2+bss":  # the objective's only regularizer
        assert [k for k in row if k.startswith("train/reg/")] == ["train/reg/bss"]


# ------------------------------------------------------------------------------------------------
# +lpft
# ------------------------------------------------------------------------------------------------
def test_probe_leaves_the_backbone_bit_identical(data: Path, tmp_path: Path) -> None:
    cfg = _cfg(data, tmp_path / "run", "l2+lpft", lp_epochs=2, lp_lr=0.1)
    built = build_run(cfg, CPU)
    source = copy.deepcopy(built.source.state_dict())
    before = copy.deepcopy(built.model.state_dict())
    probe = recipes.prepare_probe(cfg, built, None, None, lambda value: value, True)
    assert probe is not None and probe.how == "trained"
    after = built.model.state_dict()
    head = [key for key in after if key.startswith(built.head + ".")]
    assert head == ["fc.weight", "fc.bias"]
    for key, value in after.items():  # parameters and BatchNorm buffers alike
        if key in head:
            assert torch.equal(value, probe.head[key[len("fc.") :]]), key  # fine-tuning starts here
            assert not torch.equal(value, before[key]), key  # and it was trained
        else:
            assert torch.equal(value, before[key]), key
    for key, value in built.source.state_dict().items():
        assert torch.equal(value, source[key]), key


@pytest.mark.slow
def test_attention_head_is_the_probe_when_trained_the_same_way(
    data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """delta's attention head with --bn frozen and the probe's epochs and lr is the head an l2
    run probes, bit for bit; with --bn adapt the probe is trained on its own (and logged)."""
    with caplog.at_level(logging.INFO, logger="deltaft"):
        delta = run_training(_cfg(data, tmp_path / "delta", "delta+lpft", bn="frozen"))
        l2 = run_training(_cfg(data, tmp_path / "l2", "l2+lpft", bn="frozen"))
        adapt = run_training(_cfg(data, tmp_path / "adapt", "delta+lpft"))
    assert [s["probe"]["how"] for s in (delta, l2, adapt)] == [
        "attention head",
        "trained",
        "trained",
    ]
    assert delta["probe"] == {"how": "attention head", "epochs": 1, "lr": 0.01, "seconds": 0.0}
    heads = [
        load_state(tmp_path / r / "checkpoints" / "last.pt")["probe_head"] for r in ("delta", "l2")
    ]
    for key in ("weight", "bias"):
        assert torch.equal(heads[0][key], heads[1][key]), key
    assert "linear probe: the attention head, reused" in caplog.text
    assert "linear probe: trained on its own (--bn adapt lets" in caplog.text


# ------------------------------------------------------------------------------------------------
# +wise
# ------------------------------------------------------------------------------------------------
def test_wise_chooses_on_validation_and_scores_test_once(data: Path) -> None:
    """run_wise evaluates every alpha on val, then test once, with the chosen weights."""
    cfg = _cfg(data, data / "unused", "l2+wise", wise_alphas=[0.0, 0.5, 1.0])
    built = build_run(cfg, CPU)
    theta0 = {k: v.clone() for k, v in built.model.state_dict().items()}
    finetuned = copy.deepcopy(built.model)
    with torch.no_grad():
        for param in finetuned.parameters():
            param.add_(0.1)
    calls: list[tuple[str, torch.Tensor]] = []
    accuracy = {0.0: 0.5, 0.5: 0.75, 1.0: 0.75}  # a tie: the lower loss wins
    loss = {0.0: 1.0, 0.5: 0.9, 1.0: 1.1}

    def evaluate(model: torch.nn.Module, split: str) -> dict[str, float]:
        weight = model.state_dict()["fc.bias"].clone()
        calls.append((split, weight))
        alpha = round(float((weight - theta0["fc.bias"]).mean() / 0.1), 6)
        return {"acc": accuracy[alpha], "loss": loss[alpha]}

    result = recipes.run_wise(cfg, built, finetuned, theta0, evaluate, has_test=True)
    assert [split for split, _ in calls] == ["val", "val", "val", "test"]
    assert torch.equal(calls[-1][1], calls[1][1])  # test saw alpha 0.5's weights
    assert result.summary["alpha"] == 0.5
    assert result.summary["val_accuracy"] == {"0": 0.5, "0.5": 0.75, "1": 0.75}
    assert result.summary["bn_batches"] == 2
    assert torch.equal(result.state["fc.bias"], calls[1][1])
    # BatchNorm re-estimated per alpha: alpha 1's statistics are not the fine-tuned network's
    assert not torch.equal(result.state["stem.1.running_mean"], theta0["stem.1.running_mean"])


def test_wise_run_files_and_swapped_test_images_do_not_move_the_choice(
    data: Path, tmp_path: Path
) -> None:
    swapped = tmp_path / "swapped"
    shutil.copytree(data, swapped)
    for i, name in enumerate(CLASSES):  # the test images change labels; train and val do not
        shutil.copytree(
            data / "test" / name,
            swapped / "test" / CLASSES[(i + 1) % len(CLASSES)],
            dirs_exist_ok=True,
        )
    runs = [tmp_path / "a", tmp_path / "b"]
    summaries = [
        run_training(_cfg(d, r, "l2+wise")) for d, r in zip((data, swapped), runs, strict=True)
    ]
    first, second = summaries
    assert first["wise"]["alpha"] == second["wise"]["alpha"]
    assert first["wise"]["val_accuracy"] == second["wise"]["val_accuracy"]
    wise = first["wise"]
    assert wise["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert set(wise["val_accuracy"]) == {"0", "0.25", "0.5", "0.75", "1"}
    chosen = f"{wise['alpha']:g}"
    assert first["val_accuracy"] == wise["val_accuracy"][chosen]
    assert first["test_accuracy"] == wise["test_accuracy"]  # the headline is WiSE's
    assert set(first["finetuned"]) == {"val_accuracy", "val_loss", "test_accuracy", "test_loss"}
    assert "probe" in first and first["probe"]["how"] == "trained"
    state = load_state(runs[0] / "checkpoints" / "wise.pt")
    assert state["wise_alpha"] == wise["alpha"]
    result = evaluate_checkpoint(runs[0], checkpoint="wise", device="cpu", model=MODEL)
    assert result["accuracy"] == pytest.approx(wise["test_accuracy"])


def test_wise_fine_tunes_from_theta_0_as_lpft_does(data: Path, tmp_path: Path) -> None:
    """WiSE-FT's authors fine-tune from theta_0 (the probed head): l2+wise trains exactly as
    l2+lpft+wise, and its fine-tuned head is not the one a fresh head would give."""
    wise, both, _ = (
        run_training(_cfg(data, tmp_path / name, method))
        for name, method in (("w", "l2+wise"), ("b", "l2+lpft+wise"), ("p", "l2"))
    )
    finetuned = [load_state(tmp_path / n / "checkpoints" / "last.pt")["model"] for n in "wbp"]
    for key, value in finetuned[0].items():
        assert torch.equal(value, finetuned[1][key]), key
    assert wise["wise"] == both["wise"]
    head = [k for k in finetuned[0] if k.startswith("fc.") or k.startswith("head.")]
    assert head and any(not torch.equal(finetuned[0][k], finetuned[2][k]) for k in head)


def test_wise_without_validation_is_refused_before_training(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_images(root, "train", 4, 0)
    write_images(root, "test", 1, 2)
    out = tmp_path / "run"
    with pytest.raises(SettingError, match=r"no validation split; set val_split \(e.g. 0.2\)"):
        run_training(_cfg(root, out, "delta+lpft+wise"))
    assert not out.exists()
    with pytest.raises(SettingError, match=r"delta\+wise chooses its mixing weight"):
        run_compare(_cfg(root, out, "l2"), ["l2", "delta+wise"], [0], tmp_path / "cmp")
    assert not (tmp_path / "cmp").exists()
    run_training(_cfg(root, out, "l2+wise", val_split=0.25))  # a held-out split is validation
    assert (out / "checkpoints" / "wise.pt").is_file()


@pytest.mark.slow
def test_interrupted_lpft_wise_run_resumes_exactly_without_probing_again(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = run_training(_cfg(data, tmp_path / "straight", "l2+lpft+wise", epochs=2))

    def interrupt(progress: Progress) -> None:
        if (progress.epoch, progress.step) == (2, 2):
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    with pytest.raises(TrainingInterrupted):
        run_training(_cfg(data, out, "l2+lpft+wise", epochs=2), progress=interrupt)

    def no_probe(*args: object) -> None:
        raise AssertionError("a resumed run probed again")

    monkeypatch.setattr(recipes, "_train_probe", no_probe)
    resumed = run_training(_cfg(data, out, "l2+lpft+wise", epochs=2, resume=True))
    assert resumed["probe"]["how"] == "checkpoint"
    for name in ("last", "wise"):
        one, two = (
            load_state(r / "checkpoints" / f"{name}.pt") for r in (tmp_path / "straight", out)
        )
        for key, value in one["model"].items():
            assert torch.equal(value, two["model"][key]), (name, key)
    assert resumed["wise"] == straight["wise"]
    assert resumed["test_accuracy"] == straight["test_accuracy"]


# ------------------------------------------------------------------------------------------------
# compare
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compare_trains_specs_and_resume_refuses_a_changed_spec(data: Path, tmp_path: Path) -> None:
    methods = ["l2", "l2+lpft+wise", "delta", "delta+bss"]
    base = _cfg(data, tmp_path / "unused", "l2", bss_eta=0.01)
    result = run_compare(base, methods, [0], tmp_path / "cmp")
    assert [row.method for row in result.rows] == methods
    wise_run = tmp_path / "cmp" / "l2+lpft+wise-seed0"
    assert result.rows[1].runs[0].accuracy == 100 * _summary(wise_run)["wise"]["test_accuracy"]
    configs = {m: _summary(tmp_path / "cmp" / f"{m}-seed0")["config"] for m in methods}
    assert configs["delta+bss"]["bss_eta"] == 0.01 and configs["l2"]["bss_eta"] == 0.001
    rows = _rows(tmp_path / "cmp" / "delta+bss-seed0")
    assert rows[0]["train/reg/bss"] > 0
    changed = _cfg(data, tmp_path / "cmp" / "delta-seed0", "delta+bss", resume=True)
    with pytest.raises(SettingError, match=r"changed settings \(method 'delta' -> 'delta\+bss'"):
        run_training(changed)
