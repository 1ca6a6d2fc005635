"""``deltaft train`` / ``attention`` / ``eval`` as functions: the command-line layer of the library.

:func:`run_training` is what ``deltaft train`` runs. Unlike the rest of the library it changes
global state on purpose, as a training script does: it seeds Python, NumPy and torch from
``cfg.seed`` (and again at the start of every epoch, from ``(seed, epoch)``), so that a run is
reproducible and a resumed run continues exactly as the uninterrupted one would have. Call it
from a script or from :mod:`deltaft.app.compare`; use :mod:`deltaft.engine` and
:class:`~deltaft.objective.TransferObjective` directly to train inside your own loop.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import logging
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from deltaft.app import distributed
from deltaft.app.config import TrainConfig
from deltaft.app.data import DataSplits, ImageFolder, build_datasets
from deltaft.app.distributed import DistInfo, ShardSampler
from deltaft.app.errors import UserError
from deltaft.app.models import ModelInfo, build_model
from deltaft.app.tracking import RunDir, capture_rng_state, restore_rng_state
from deltaft.attention import ChannelAttention, estimate_channel_attention, model_fingerprint
from deltaft.engine import (
    Amp,
    EpochState,
    NonFiniteLossError,
    ProgressFn,
    TrainingInterrupted,
    evaluate,
    train_one_epoch,
)
from deltaft.heads import replace_head
from deltaft.layers import default_layers, validate_layers
from deltaft.objective import TransferObjective
from deltaft.source import FrozenSource

__all__ = [
    "evaluate_checkpoint",
    "resolve_device",
    "run_attention",
    "run_training",
    "seed_everything",
]

logger = logging.getLogger(__name__)

_FEATURE_METHODS = ("fm", "delta")
_DOMINANT_RATIO = 10.0  # warn when the regularizer exceeds the task loss this many times


# ------------------------------------------------------------------------------------------------
# Seeds and devices
# ------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _derived_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` (e.g. ``(seed, "epoch", 3, rank)``), stable across runs."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def resolve_device(name: str, info: DistInfo | None = None) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; under ``torchrun``, ``cuda`` is
    ``cuda:LOCAL_RANK``.

    Raises:
        UserError: CUDA requested but not available.
    """
    local_rank = info.local_rank if info is not None and info.enabled else None
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available here; use --device cpu.")
        if device.index is None:
            device = torch.device("cuda", local_rank if local_rank is not None else 0)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available here; use --device cpu.")
    return device


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------
def _build_source(cfg: TrainConfig) -> tuple[nn.Module, ModelInfo]:
    return build_model(cfg.model, weights=cfg.weights, head=cfg.head)


def _build_data(cfg: TrainConfig, info: ModelInfo, image_size: int) -> DataSplits:
    return build_datasets(
        cfg.data,
        image_size=image_size,
        preset=cfg.preset,
        hflip=cfg.hflip,
        crop_scale=cfg.crop_scale,
        mean=info.mean,
        std=info.std,
        per_class=cfg.per_class,
        fraction=cfg.fraction,
        val_split=cfg.val_split,
        seed=cfg.seed,
        download=cfg.download,
        data_root=cfg.data_root,
    )


def _verify_data(splits: DataSplits) -> list[str]:
    """Decode every image once: the full list of unreadable files, and a class check.

    Raises:
        UserError: a class of the training split has no readable image.
    """
    skipped = splits.verify()
    train = splits.train
    if isinstance(train, ImageFolder):
        readable = {label for path, label in train.samples if path not in train.skipped}
        empty = [name for label, name in enumerate(train.classes) if label not in readable]
        if empty:
            folders = ", ".join(str(train.root / name) for name in empty)
            raise UserError(
                f"Class folder(s) {folders} have no readable image (every file failed to "
                "decode); fix or re-save the images, or remove the folder."
            )
    if skipped:  # each was named in a warning as it was found
        logger.info("%d unreadable image(s) skipped; summary.json lists them.", len(skipped))
    return skipped


def _loader(
    dataset: Dataset[Any],
    cfg: TrainConfig,
    device: torch.device,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    sampler: Any = None,
    drop_last: bool = False,
) -> DataLoader[Any]:
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        drop_last=drop_last,
        generator=generator,
        persistent_workers=False,
    )


def _resolve_layers(cfg: TrainConfig, model: nn.Module, image_size: int) -> list[str] | None:
    """The regularized layers (``fm``/``delta``), validated; ``None`` for the other methods."""
    if cfg.method not in _FEATURE_METHODS:
        if cfg.layers:
            logger.warning("--layers ignored: method %s regularizes no feature map.", cfg.method)
        return None
    layers = cfg.layers or default_layers(model, input_size=image_size)
    try:
        validate_layers(model, layers, input_size=image_size)
    except ValueError as error:
        raise UserError(str(error)) from None
    return list(layers)


def _load_attention(
    path: str | Path, source: nn.Module, layers: Sequence[str] | None, *, flag: str
) -> ChannelAttention:
    """Read an attention file; check it against the source model (and ``layers`` when given)."""
    try:
        attention = ChannelAttention.load(path, model=source)
        if layers is not None:
            attention.check_compatible(layers)
    except FileNotFoundError:
        raise UserError(f"{flag} {path}: no such file.") from None
    except ValueError as error:
        raise UserError(f"{flag} {path}: {error}") from None
    return attention


def _estimate_attention(
    cfg: TrainConfig,
    source: nn.Module,
    train: Dataset[Any],
    layers: Sequence[str],
    num_classes: int,
    head: str,
    device: torch.device,
) -> ChannelAttention:
    """Estimate the channel attention on the training split, reproducibly from ``cfg.seed``."""
    seed_everything(_derived_seed(cfg.seed, "attention"))
    generator = torch.Generator().manual_seed(_derived_seed(cfg.seed, "attention-data"))
    loader = _loader(train, cfg, device, shuffle=True, generator=generator)
    start = time.perf_counter()
    try:
        attention = estimate_channel_attention(
            source,
            loader,
            layers,
            num_classes,
            epochs=cfg.attention_epochs,
            bn=cfg.bn,
            n_batches=cfg.attention_batches,
            temperature=cfg.temperature,
            method=cfg.attention_method,
            head=head,
            device=device,
        )
    except UserError:
        raise
    except ValueError as error:
        raise UserError(f"attention estimation: {error}") from None
    logger.info(
        "attention: %d layers, %d channels in %.1f s",
        len(attention.layers),
        sum(attention.channels.values()),
        time.perf_counter() - start,
    )
    return attention


def _optimizer(cfg: TrainConfig, objective: TransferObjective) -> torch.optim.Optimizer:
    groups = objective.param_groups(lr=cfg.lr, head_lr=cfg.head_lr)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def _scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedules; see :class:`~deltaft.app.config.TrainConfig` ``schedule``."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if cfg.schedule == "exponential":
        gamma = cfg.lr_gamma ** (1.0 / total_steps)
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
    milestone = max(1, round(cfg.step_at * total_steps))
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, [milestone], gamma=cfg.lr_gamma)


def _budget(cfg: TrainConfig, steps_per_epoch: int) -> tuple[int, int, int]:
    """``(epochs, total steps, steps of the last epoch)``."""
    if cfg.iterations is not None:
        epochs = math.ceil(cfg.iterations / steps_per_epoch)
        return epochs, cfg.iterations, cfg.iterations - (epochs - 1) * steps_per_epoch
    assert cfg.epochs is not None  # TrainConfig resolves one of the two
    return cfg.epochs, cfg.epochs * steps_per_epoch, steps_per_epoch


def _open_run(run: RunDir, cfg: TrainConfig) -> dict[str, Any] | None:
    """Check that the run directory may be used; the checkpoint to resume from, if any."""
    if not cfg.resume:
        run.check_new()
        return None
    run.remove_stale_temporaries()
    last = run.checkpoint_path("last")
    if last.is_file():
        state = run.load_checkpoint("last")
        changed = cfg.differences(state.get("config", {}))
        if changed:
            listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise UserError(
                f"Cannot resume {run.path} with changed settings ({listed}); resume with the "
                f"settings of {run.config_path}, or start a new --out."
            )
        return state
    if run.holds_run():
        logger.warning("%s has no checkpoint yet: starting it again from epoch 1.", run.path)
    else:
        run.check_new()
        logger.info("Nothing to resume in %s: starting a new run.", run.path)
    return None


def _device_tweaks(cfg: TrainConfig, device: torch.device) -> tuple[Amp, bool]:
    """``(amp, channels_last)`` as they apply on ``device`` (both are CUDA-only)."""
    amp, channels_last = cfg.amp, cfg.channels_last
    if device.type != "cuda" and (amp != "none" or channels_last):
        logger.warning("--amp/--channels-last apply on CUDA only; ignored on %s.", device)
        return "none", False
    return amp, channels_last


def _format_metrics(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())


def _epoch_line(epoch: int, epochs: int, row: Mapping[str, Any]) -> str:
    parts = {k[len("train/") :]: v for k, v in row.items() if k.startswith("train/")}
    acc = parts.pop("acc", None)
    text = f"epoch {epoch}/{epochs}: {_format_metrics(parts)}"
    if acc is not None:
        text += f"; train acc {100 * acc:.2f}%"
    if row.get("val/acc") is not None:
        text += f"; val acc {100 * row['val/acc']:.2f}% (loss {row['val/loss']:.4g})"
    return text + f"; lr {row['lr']:.3g}; {row['seconds']:.1f} s, {row['images_per_s']:.1f} img/s"


def _plot(rows: list[dict[str, Any]], attention: ChannelAttention | None, run: RunDir) -> None:
    """``curves.png`` and ``attention.png``; a failing figure never fails a finished run."""
    try:
        from deltaft.app import plots
    except ImportError:
        return
    try:
        plots.plot_curves(rows, run.path / "curves.png")
        if attention is not None:
            plots.plot_attention(attention, run.path / "attention.png")
    except Exception as error:  # figures are a convenience: report, don't lose the run
        logger.warning("Figures not written: %s: %s", type(error).__name__, error)


def _reg_to_task(metrics: Mapping[str, float]) -> float | None:
    """Sum of the ``reg/...`` parts over ``task_loss`` (``None`` without a regularizer part)."""
    reg = [value for key, value in metrics.items() if key.startswith("reg/")]
    task = metrics.get("task_loss")
    if not reg or task is None:
        return None
    return sum(reg) / task if task > 0 else math.inf


@contextlib.contextmanager
def _stop_on_sigint(enabled: bool) -> Iterator[Callable[[], bool]]:
    """Within the block, a first Ctrl-C (SIGINT) only asks training to stop after the current
    step, so that it can save where it is; a second one raises ``KeyboardInterrupt`` at once.

    Yields whether a stop was asked. Only in the main thread, where SIGINT has Python's default
    handler, and ``enabled`` (a single process: distributed ranks would stop at different steps).
    """
    asked = threading.Event()
    previous = signal.getsignal(signal.SIGINT)
    usable = threading.current_thread() is threading.main_thread()
    if not (enabled and usable and previous is signal.default_int_handler):
        yield asked.is_set
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        asked.set()
        signal.signal(signal.SIGINT, previous)  # the next Ctrl-C interrupts at once

    signal.signal(signal.SIGINT, handler)
    try:
        yield asked.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


# ------------------------------------------------------------------------------------------------
# deltaft train
# ------------------------------------------------------------------------------------------------
def run_training(
    cfg: TrainConfig, *, progress: ProgressFn | None = None, dist: DistInfo | None = None
) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` on ``cfg.data`` with ``cfg.method`` and write the run directory.

    Steps: seed; build the source network and the datasets; copy the source and give the copy a
    new head; for ``delta``, estimate the channel attention (or load ``cfg.attention``, checked
    against the source's fingerprint and the layers); build the
    :class:`~deltaft.objective.TransferObjective`, the optimizer (over
    ``objective.param_groups``) and a per-step lr schedule; train, evaluating on the validation
    split after every epoch; evaluate the last weights on the test split; write
    ``summary.json`` and the figures. ``best.pt`` is chosen by validation accuracy (the last
    epoch without a validation split), never by test accuracy. Nothing is written before every
    setting has been checked.

    With ``cfg.resume`` it continues from ``checkpoints/last.pt`` (model, optimizer, schedule,
    scaler, RNG states, epoch, metrics) and ends with the same weights and metrics as an
    uninterrupted run: each epoch reseeds the RNGs and the data order from ``(seed, epoch)``.
    On a single process, a first Ctrl-C stops training after the current step and saves
    ``last.pt`` with the epoch's progress (a second Ctrl-C stops at once); resuming replays the
    epoch's data order up to that step and continues it, again to the same result.

    Args:
        cfg: the run's settings.
        progress: called after every training step (see :class:`~deltaft.engine.Progress`);
            only on rank 0 under ``torchrun``.
        dist: the process group; default :func:`deltaft.app.distributed.current`.

    Returns:
        The summary, as written to ``summary.json``: ``val_accuracy`` / ``test_accuracy``
        (fractions in [0, 1], last epoch, ``None`` without that split), ``best_epoch``,
        ``best_val_accuracy``, ``best_test_accuracy`` (the ``best.pt`` weights), ``seconds``,
        ``skipped`` (``{"count", "files"}``), ``method``, ``seed``, ``config``, ...

    Raises:
        UserError: invalid data, model, layers, attention file, or run directory.
        NonFiniteLossError: the loss diverged; ``last.pt`` keeps the last finished epoch.
        TrainingInterrupted: Ctrl-C; the message says what was saved and how to resume.
    """
    started = time.perf_counter()
    dist = dist or distributed.current()
    run = RunDir(cfg.out, write=dist.is_main)
    resume_state = _open_run(run, cfg)
    dist.barrier()  # every process checked the directory before rank 0 writes to it
    training = _Training(cfg, run, dist, resume_state)
    training.start(resume_state)
    training.fit(progress, started)
    return training.finish(started)


@dataclass
class _Best:
    """The best epoch so far by validation accuracy (the last epoch without validation)."""

    epoch: int = 0
    val_accuracy: float | None = None

    def update(self, epoch: int, val_accuracy: float | None) -> bool:
        """Record ``epoch`` if it is the new best; returns whether it is."""
        # Without validation every epoch is the newest best; of equal accuracies the first stays.
        if val_accuracy is None or self.val_accuracy is None or val_accuracy > self.val_accuracy:
            self.epoch, self.val_accuracy = epoch, val_accuracy
            return True
        return False


class _Training:
    """One run of :func:`run_training`: everything it builds, and its loop state."""

    def __init__(
        self,
        cfg: TrainConfig,
        run: RunDir,
        dist: DistInfo,
        resume_state: Mapping[str, Any] | None,
    ) -> None:
        self.cfg, self.run, self.dist = cfg, run, dist
        seed_everything(cfg.seed)
        self.device = resolve_device(cfg.device, dist)
        self.amp, self.channels_last = _device_tweaks(cfg, self.device)
        source, self.info = _build_source(cfg)
        self.image_size = cfg.image_size or self.info.input_size
        self.splits = _build_data(cfg, self.info, self.image_size)
        self.skipped = _verify_data(self.splits)
        self.classes = list(self.splits.classes)
        model = copy.deepcopy(source)
        self.head = replace_head(model, len(self.classes), self.info.head)
        self.fingerprint = model_fingerprint(source)
        if resume_state is not None and resume_state.get("model_fingerprint") != self.fingerprint:
            raise UserError(
                f"The source weights ({cfg.model}, --weights {cfg.weights}) differ from those "
                f"the run in {run.path} started from; resume with the same weights or start a "
                "new --out."
            )
        layers = _resolve_layers(cfg, model, self.image_size)
        self.attention: ChannelAttention | None = None
        self.attention_seconds = 0.0
        if cfg.method == "delta" and layers is not None:
            tic = time.perf_counter()
            self.attention = _attention_for_run(
                cfg, run, resume_state, source, self.splits, layers, self.head, dist, self.device
            )
            self.attention_seconds = time.perf_counter() - tic
            layers = self.attention.layers if cfg.layers is None else layers
        elif cfg.attention:
            logger.warning("--attention ignored: method %s uses no attention.", cfg.method)
        self.layers = list(layers or [])
        self.objective = TransferObjective(
            model,
            FrozenSource(source, self.layers, bn=cfg.source_bn, mkldnn=cfg.source_mkldnn),
            cfg.method,
            layers=layers,
            attention=self.attention,
            alpha=cfg.alpha,
            beta=cfg.beta,
            head=self.head,
            reduction=cfg.reduction,
            weight_decay=cfg.weight_decay,
            input_size=self.image_size,
        ).to(self.device)
        if self.channels_last:
            self.objective.to(memory_format=torch.channels_last)
        self._build_loaders()
        self.epochs, total_steps, self.last_steps = _budget(cfg, len(self.train_loader))
        self.optimizer = _optimizer(cfg, self.objective)
        self.scheduler = _scheduler(cfg, self.optimizer, total_steps)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == "fp16" else None
        self.history: list[dict[str, Any]] = []
        self.best = _Best()
        self.epoch = self.global_step = 0
        self.elapsed_before = 0.0
        self.partial: dict[str, Any] | None = None  # an interrupted epoch to continue
        self.dominant_reported = False

    def _build_loaders(self) -> None:
        cfg, dist, train = self.cfg, self.dist, self.splits.train
        # The data order comes from (seed, epoch): the generator is reseeded every epoch.
        self.generator = torch.Generator()
        self.sampler: DistributedSampler[Any] | None = None
        if dist.enabled:
            self.sampler = DistributedSampler(
                train, dist.world_size, dist.rank, shuffle=True, seed=cfg.seed, drop_last=True
            )
        n_train = len(train)  # type: ignore[arg-type]
        self.train_loader = _loader(
            train,
            cfg,
            self.device,
            shuffle=True,
            generator=self.generator,
            sampler=self.sampler,
            drop_last=n_train >= cfg.batch_size * dist.world_size,  # no last batch of 1 for BN
        )
        if len(self.train_loader) == 0:
            raise UserError(f"The training split of {cfg.data} is empty; add images.")
        self.eval_loaders = {
            name: _loader(
                split,
                cfg,
                self.device,
                shuffle=False,
                sampler=ShardSampler(split, dist) if dist.enabled else None,  # type: ignore[arg-type]
            )
            for name, split in (("val", self.splits.val), ("test", self.splits.test))
            if split is not None
        }

    # -- state ----------------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        """What every checkpoint carries besides weights: enough to rebuild and evaluate."""
        return {
            "config": self.cfg.to_dict(),
            "classes": self.classes,
            "head": self.head,
            "model_fingerprint": self.fingerprint,
            "layers": self.layers,
            "image_size": self.image_size,
            "mean": list(self.info.mean),
            "std": list(self.info.std),
        }

    def start(self, resume_state: Mapping[str, Any] | None) -> None:
        """Write the run's first files, or restore the state of ``last.pt``."""
        run = self.run
        if resume_state is None:
            run.write_config(self.cfg.to_yaml())
            run.reset_metrics()
        else:
            self.objective.model.load_state_dict(resume_state["model"])
            self.optimizer.load_state_dict(resume_state["optimizer"])
            self.scheduler.load_state_dict(resume_state["scheduler"])
            if self.scaler is not None and resume_state.get("scaler"):
                self.scaler.load_state_dict(resume_state["scaler"])
            restore_rng_state(resume_state["rng"])
            self.epoch = int(resume_state["epoch"])
            self.global_step = int(resume_state["global_step"])
            self.elapsed_before = float(resume_state.get("seconds", 0.0))
            self.history = list(resume_state.get("metrics", []))
            self.best = _Best(**resume_state.get("best", {}))
            run.reset_metrics(self.history)  # drops a row written after the checkpoint
            partial = resume_state.get("partial")
            if partial is not None:
                self.partial = {**partial, "rng": resume_state["rng"]}
            at = f", at step {partial['step']} of epoch {partial['epoch']}" if partial else ""
            logger.info(
                "Resuming %s after epoch %d of %d%s.", run.path, self.epoch, self.epochs, at
            )
        fresh = resume_state is None or not run.attention_path.is_file()
        if self.attention is not None and self.dist.is_main and fresh:
            self.attention.save(run.attention_path)

    def _last_state(self, epoch: int, started: float) -> dict[str, Any]:
        """Everything ``last.pt`` holds after ``epoch`` finished epochs."""
        return {
            **self._meta(),
            "model": self.objective.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": epoch,
            "epochs": self.epochs,
            "global_step": self.global_step,
            "rng": capture_rng_state(),
            "best": dataclasses.asdict(self.best),
            "metrics": self.history,
            "seconds": self.elapsed_before + time.perf_counter() - started,
        }

    def _save(self, row: Mapping[str, Any], started: float) -> None:
        """``best.pt`` (when this epoch is the best), ``last.pt``, then the metrics line."""
        if self.best.update(self.epoch, row.get("val/acc")):
            model_state = self.objective.model.state_dict()
            best = {"model": model_state, "epoch": self.epoch, **dataclasses.asdict(self.best)}
            self.run.save_checkpoint({**self._meta(), **best}, "best")
        self.run.save_checkpoint(self._last_state(self.epoch, started), "last")
        self.run.append_metrics(row)

    def _save_partial(self, state: EpochState, started: float) -> None:
        """``last.pt`` in the middle of epoch ``self.epoch``: the finished epochs, plus the
        epoch's running totals (``partial``) and the RNG states after its last step done."""
        partial = {"epoch": self.epoch, **dataclasses.asdict(state)}
        self.run.save_checkpoint({**self._last_state(self.epoch - 1, started), "partial": partial})

    def _epoch_batches(self) -> tuple[Iterator[Any], EpochState]:
        """This epoch's batches and totals; an interrupted epoch continues after its last step.

        The data order depends only on ``(seed, epoch)``, so skipping the batches the
        interrupted run trained on (they are loaded, not trained on) and restoring the RNG
        states it saved puts the run exactly where it stopped.
        """
        batches = iter(self.train_loader)
        partial, self.partial = self.partial, None
        if partial is None or partial["epoch"] != self.epoch:
            return batches, EpochState()
        for _ in range(partial["step"]):
            next(batches)
        restore_rng_state(partial["rng"])
        fields = {f.name: partial[f.name] for f in dataclasses.fields(EpochState)}
        return batches, EpochState(**fields)

    def _report_balance(self, metrics: Mapping[str, float]) -> float | None:
        """The regularizer-to-task-loss ratio of the epoch; a warning when it dominates."""
        ratio = _reg_to_task(metrics)
        if ratio is not None and ratio > _DOMINANT_RATIO and not self.dominant_reported:
            self.dominant_reported = True
            logger.warning(
                "epoch %d: the regularizer is %.3g times the task loss (task_loss %.4g): "
                "--alpha %g (--beta %g) may dominate training; consider a smaller --alpha. "
                "metrics.jsonl logs the ratio of every epoch (train/reg_to_task).",
                self.epoch,
                ratio,
                metrics["task_loss"],
                self.cfg.alpha,
                self.cfg.beta,
            )
        return ratio

    # -- loop -----------------------------------------------------------------------------------
    def _evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        reduce = self.dist.all_reduce_sum if self.dist.enabled else None
        return evaluate(
            model,
            self.eval_loaders[split],
            device=self.device,
            amp=self.amp,
            channels_last=self.channels_last,
            reduce=reduce,
        )

    def _resume_hint(self) -> str:
        return f"continue it with: deltaft train --out {self.run.path} --resume"

    def fit(self, progress: ProgressFn | None, started: float) -> None:
        """Train the remaining epochs; validate and checkpoint after each.

        Raises:
            TrainingInterrupted: Ctrl-C (see :func:`_stop_on_sigint`), after saving ``last.pt``.
            NonFiniteLossError: with the epoch ``last.pt`` keeps added to the message.
        """
        with _stop_on_sigint(not self.dist.enabled) as stop:
            trainer = distributed.wrap(self.objective, self.dist, self.device)
            while self.epoch < self.epochs:
                if stop():  # Ctrl-C while validating or saving: last.pt is this epoch's
                    raise TrainingInterrupted(
                        f"Interrupted after epoch {self.epoch}; {self.run.checkpoint_path()} "
                        f"holds it; {self._resume_hint()}"
                    )
                self._fit_epoch(trainer, progress, started, stop)

    def _fit_epoch(
        self,
        trainer: nn.Module,
        progress: ProgressFn | None,
        started: float,
        stop: Callable[[], bool],
    ) -> None:
        cfg, dist = self.cfg, self.dist
        self.epoch += 1
        seed_everything(_derived_seed(cfg.seed, "epoch", self.epoch, dist.rank))
        self.generator.manual_seed(_derived_seed(cfg.seed, "order", self.epoch))
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch)
        batches, state = self._epoch_batches()
        try:
            metrics = train_one_epoch(
                trainer,
                batches,
                self.optimizer,
                self.scheduler,
                device=self.device,
                amp=self.amp,
                epoch=self.epoch,
                epochs=self.epochs,
                progress=progress if dist.is_main else None,
                scaler=self.scaler,
                max_steps=self.last_steps if self.epoch == self.epochs else None,
                channels_last=self.channels_last,
                reduce=dist.all_reduce_sum if dist.enabled else None,
                state=state,
                should_stop=stop,
            )
        except TrainingInterrupted as where:
            self._save_partial(state, started)
            raise TrainingInterrupted(
                f"Interrupted at {where}; saved {self.run.checkpoint_path()}; {self._resume_hint()}"
            ) from None
        except NonFiniteLossError as error:
            last = self.run.checkpoint_path()
            kept = (
                f"The last good checkpoint, {last} (epoch {self.epoch - 1}), is kept."
                if last.is_file()
                else "No checkpoint had been written yet."
            )
            raise NonFiniteLossError(f"{error} {kept}") from None
        finally:
            del batches  # stop this epoch's DataLoader workers
        self.global_step += int(metrics.pop("steps"))
        dist.broadcast_buffers(self.objective.model)  # same BatchNorm statistics everywhere
        row: dict[str, Any] = {"epoch": self.epoch, "step": self.global_step}
        row.update({key: metrics.pop(key) for key in ("lr", "seconds", "images_per_s")})
        row["images"] = metrics.pop("images")
        row.update({f"train/{key}": value for key, value in metrics.items()})
        ratio = self._report_balance(metrics)
        if ratio is not None:
            row["train/reg_to_task"] = ratio
        if "val" in self.eval_loaders:
            val = self._evaluate(self.objective.model, "val")
            row.update({"val/loss": val["loss"], "val/acc": val["acc"]})
        self.history.append(row)
        logger.info("%s", _epoch_line(self.epoch, self.epochs, row))
        self._save(row, started)

    def _best_test_accuracy(self, last: float | None) -> float | None:
        """Test accuracy of the ``best.pt`` weights (``last``'s when the last epoch is best)."""
        path = self.run.checkpoint_path("best")
        if last is None or self.best.epoch == self.epoch or not path.is_file():
            return last
        # Every process can read best.pt: rank 0 wrote it before the last epoch's collectives.
        best_model = copy.deepcopy(self.objective.model)
        best_model.load_state_dict(self.run.load_checkpoint("best")["model"])
        return self._evaluate(best_model, "test")["acc"]

    def finish(self, started: float) -> dict[str, Any]:
        """Evaluate the last weights on every split, write ``summary.json`` and the figures."""
        final = {split: self._evaluate(self.objective.model, split) for split in self.eval_loaders}
        val, test = final.get("val", {}), final.get("test", {})
        splits = self.splits
        summary = {
            "method": self.cfg.method,
            "seed": self.cfg.seed,
            "model": self.cfg.model,
            "data": self.cfg.data,
            "out": str(self.run.path),
            "classes": len(self.classes),
            "epochs": self.epoch,
            "steps": self.global_step,
            "train_images": _size(splits.train),
            "val_images": _size(splits.val),
            "test_images": _size(splits.test),
            "val_accuracy": val.get("acc"),
            "val_loss": val.get("loss"),
            "test_accuracy": test.get("acc"),
            "test_loss": test.get("loss"),
            "best_epoch": self.best.epoch,
            "best_val_accuracy": self.best.val_accuracy,
            "best_test_accuracy": self._best_test_accuracy(test.get("acc")),
            "seconds": self.elapsed_before + time.perf_counter() - started,
            "attention_seconds": self.attention_seconds,
            "layers": self.layers,
            "skipped": {"count": len(self.skipped), "files": self.skipped},
            "config": self.cfg.to_dict(),
        }
        self.run.write_summary(summary)
        if self.dist.is_main:
            _plot(self.history, self.attention, self.run)
        self.dist.barrier()
        return summary


def _size(dataset: Dataset[Any] | None) -> int | None:
    return None if dataset is None else len(dataset)  # type: ignore[arg-type]


def _attention_for_run(
    cfg: TrainConfig,
    run: RunDir,
    resume_state: Mapping[str, Any] | None,
    source: nn.Module,
    splits: DataSplits,
    layers: list[str],
    head: str,
    dist: DistInfo,
    device: torch.device,
) -> ChannelAttention:
    """The run's attention: the run's own file on resume, ``--attention FILE``, or estimated
    on rank 0 and broadcast to the other processes."""
    if resume_state is not None and run.attention_path.is_file():
        stored = resume_state.get("layers") or None
        return _load_attention(run.attention_path, source, stored, flag="--resume")
    if cfg.attention:
        explicit = layers if cfg.layers is not None else None
        attention = _load_attention(cfg.attention, source, explicit, flag="--attention")
    else:
        estimated = None
        if dist.is_main:
            estimated = _estimate_attention(
                cfg, source, splits.train, layers, len(splits.classes), head, device
            )
        attention = dist.broadcast_object(estimated)
    return attention


# ------------------------------------------------------------------------------------------------
# deltaft attention
# ------------------------------------------------------------------------------------------------
def run_attention(cfg: TrainConfig, path: str | Path) -> ChannelAttention:
    """Estimate the channel attention of ``cfg.model`` on ``cfg.data`` and save it to ``path``.

    Uses ``cfg``'s data, model, layers (default rule when ``None``), batch size, seed and the
    ``attention_*``, ``temperature`` and ``bn`` settings; the result is identical to the one
    ``deltaft train`` with the same settings estimates, so the file can be reused with
    ``--attention``.

    Raises:
        UserError: as :func:`run_training`, or ``path`` exists already.
    """
    path = Path(path)
    if path.exists():
        raise UserError(f"{path} exists; choose a new --out file (nothing is overwritten).")
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    source, info = _build_source(cfg)
    image_size = cfg.image_size or info.input_size
    splits = _build_data(cfg, info, image_size)
    _verify_data(splits)
    model = copy.deepcopy(source)
    head = replace_head(model, len(splits.classes), info.head)
    layers = _resolve_layers(dataclasses.replace(cfg, method="delta"), model, image_size)
    assert layers is not None
    attention = _estimate_attention(
        cfg, source, splits.train, layers, len(splits.classes), head, device
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    attention.save(path)
    return attention


# ------------------------------------------------------------------------------------------------
# deltaft eval
# ------------------------------------------------------------------------------------------------
def evaluate_checkpoint(
    run_dir: str | Path,
    *,
    data: str | None = None,
    split: str = "test",
    checkpoint: str = "best",
    device: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Evaluate a run's checkpoint on a split of its data (or of ``data``, same classes).

    Returns:
        ``{"split", "checkpoint", "epoch", "accuracy", "loss", "images", "data"}``.

    Raises:
        UserError: no such run or checkpoint, no such split, or classes that differ.
    """
    run = RunDir(run_dir, write=False)
    if not run.path.is_dir():
        raise UserError(f"--run {run.path} is not a directory; pass a run directory.")
    state = run.load_checkpoint(checkpoint)
    overrides: dict[str, Any] = {"device": device}
    if data is not None:
        overrides["data"] = data
    if batch_size is not None:
        overrides["batch_size"] = batch_size
    if workers is not None:
        overrides["workers"] = workers
    cfg = TrainConfig.from_sources(state["config"], overrides, origin=f"{run.path} checkpoint")
    classes = list(state["classes"])
    model, _ = build_model(cfg.model, weights="none", num_classes=len(classes), head=state["head"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:  # missing, unexpected or mis-shaped tensors
        detail = (" ".join(str(error).split("\n", 2)[1:2]).strip() or str(error)).rstrip(".")
        raise UserError(
            f"{run.checkpoint_path(checkpoint)} holds weights that do not fit {cfg.model} "
            f"({detail}); the file belongs to another model or was altered."
        ) from None
    torch_device = resolve_device(cfg.device)
    model.to(torch_device)
    info = ModelInfo(
        name=cfg.model,
        input_size=int(state["image_size"]),
        mean=tuple(state["mean"]),
        std=tuple(state["std"]),
        head=state["head"],
        weights="checkpoint",
    )
    splits = _build_data(cfg, info, int(state["image_size"]))
    if list(splits.classes) != classes:
        raise UserError(
            f"The classes of {cfg.data} ({', '.join(splits.classes[:5])}...) differ from the "
            f"run's ({', '.join(classes[:5])}...); evaluate on data with the same class folders."
        )
    dataset = splits.test if split == "test" else splits.val
    if dataset is None:
        hint = "a test/ folder" if split == "test" else "a val/ folder or --val-split"
        raise UserError(f"{cfg.data} has no {split} split; give it {hint}.")
    loader = _loader(dataset, cfg, torch_device, shuffle=False)
    metrics = evaluate(model, loader, device=torch_device)
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
