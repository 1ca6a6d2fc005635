"""``deltaft eval`` as a function: a run's checkpoint evaluated on a split of its data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from deltaft.app.build import build_data, make_loader, resolve_device
from deltaft.app.config import TrainConfig
from deltaft.app.config_io import shorten
from deltaft.app.errors import SettingError, literal
from deltaft.app.models import ModelInfo, build_model, runs_code
from deltaft.app.tracking import RunDir
from deltaft.engine import evaluate

__all__ = ["evaluate_checkpoint"]


def evaluate_checkpoint(
    run_dir: str | Path,
    *,
    data: str | None = None,
    split: str = "test",
    checkpoint: str = "best",
    device: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """Evaluate a run's checkpoint on a split of its data (or of ``data``, same classes).

    The model is rebuilt from the checkpoint (its config, classes and head, no pretrained
    weights), the data with the checkpoint's image size, mean and std. Every image of the split
    is decoded first; unreadable ones are left out (``skipped`` lists them) and ``images``
    counts those evaluated.

    ``checkpoint`` names a file of ``RUN_DIR/checkpoints``: ``best``, ``last``, or ``wise`` (the
    WiSE-FT weights a ``+wise`` run chose on validation, whose test accuracy is that run's
    headline).

    The checkpoint is data, never code: nothing it names is imported, called, downloaded or
    written. A run of a ``pkg.module:factory`` model is evaluated only when the caller names the
    same factory in ``model`` (the command line's ``--model``); its ``download`` setting is
    ignored (a ``tv:NAME`` dataset must already be on disk).

    Returns:
        ``{"split", "checkpoint", "epoch", "accuracy", "loss", "images", "data", "skipped"}``.

    Raises:
        SettingError: ``run_dir`` (the ``run`` setting) is not a directory; no such split; the
            checkpoint names a model factory that ``model`` does not name, or ``model`` differs
            from the run's model.
        FileNotFoundError: no such checkpoint.
        ValueError: an unreadable checkpoint, weights that do not fit the model, classes
            that differ from the run's, or a class without a readable image in the split.
    """
    run = RunDir(run_dir, write=False)
    if not run.path.is_dir():
        raise SettingError(f"{{run}} {run.path} is not a directory; pass a run directory.")
    state = run.load_checkpoint(checkpoint)
    overrides: dict[str, Any] = {"device": device}
    if data is not None:
        overrides["data"] = data
    if batch_size is not None:
        overrides["batch_size"] = batch_size
    if workers is not None:
        overrides["workers"] = workers
    overrides["download"] = False  # only the command line may make a command download
    _check_model(state.get("config"), model, run.checkpoint_path(checkpoint))
    cfg = TrainConfig.from_sources(state["config"], overrides, origin=f"{run.path} checkpoint")
    classes = list(state["classes"])
    network = _load_model(cfg, state, run.checkpoint_path(checkpoint))
    torch_device = resolve_device(cfg.device)
    network.to(torch_device)
    info = ModelInfo(
        name=cfg.model,
        input_size=int(state["image_size"]),
        mean=tuple(state["mean"]),
        std=tuple(state["std"]),
        head=state["head"],
        weights="checkpoint",
    )
    splits = build_data(cfg, info, int(state["image_size"]))
    if list(splits.classes) != classes:
        raise ValueError(
            f"The classes of {cfg.data} ({', '.join(splits.classes[:5])}...) differ from the "
            f"run's ({', '.join(classes[:5])}...); evaluate on data with the same class folders."
        )
    dataset = splits.test if split == "test" else splits.val
    if dataset is None:
        hint = "a test/ folder" if split == "test" else "a val/ folder or {val_split}"
        raise SettingError(f"{cfg.data} has no {split} split; give it {hint}.")
    splits.verify([split])  # unreadable files leave the split: the count is what was read
    loader = make_loader(dataset, cfg, torch_device, shuffle=False)
    metrics = evaluate(network, loader, device=torch_device)
    return {
        "split": split,
        "checkpoint": checkpoint,
        "epoch": int(state["epoch"]),
        "accuracy": metrics["acc"],
        "loss": metrics["loss"],
        "images": int(metrics["images"]),
        "data": cfg.data,
        "skipped": splits.skipped(),
    }


def _check_model(config: object, given: str | None, path: Path) -> None:
    """Refuse a checkpoint whose model would run code the caller did not name, before any import.

    Raises:
        SettingError: a factory model not named by ``given``, or ``given`` is another model.
    """
    stored = config.get("model") if isinstance(config, dict) else None
    if not isinstance(stored, str):
        return  # TrainConfig reports the missing or mistyped setting
    if given is not None and given != stored:
        raise SettingError(
            f"{literal(path)} was trained with model {literal(shorten(stored))}, not "
            f"{literal(shorten(given))}; pass {{model}} {literal(shorten(stored))} or leave it out."
        )
    if given is None and runs_code(stored):
        raise SettingError(
            f"{literal(path)} names the model factory {literal(shorten(stored))}, which "
            "evaluating would import and call; a checkpoint never runs code by itself: pass "
            f"{{model}} {literal(shorten(stored))} if you trust that code."
        )


def _load_model(cfg: TrainConfig, state: dict[str, Any], path: Path) -> nn.Module:
    """``cfg.model`` with the checkpoint's head and weights.

    Raises:
        ValueError: missing, unexpected or mis-shaped tensors.
    """
    classes = len(state["classes"])
    model, _ = build_model(cfg.model, weights="none", num_classes=classes, head=state["head"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:  # missing, unexpected or mis-shaped tensors
        detail = (" ".join(str(error).split("\n", 2)[1:2]).strip() or str(error)).rstrip(".")
        raise ValueError(
            f"{path} holds weights that do not fit {cfg.model} ({detail}); the file belongs to "
            "another model or was altered."
        ) from None
    return model
