"""The epoch loop of :func:`~deltaft.app.train.run_training` and its summary.

Every epoch reseeds Python, NumPy and torch from ``(seed, "epoch", epoch, rank)`` and the data
order from ``(seed, "order", epoch)``, so that a resumed run continues exactly as the
uninterrupted one would have; :class:`~deltaft.app.checkpoint.Checkpointer` saves after every
epoch and on Ctrl-C in the middle of one.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from deltaft.app import distributed
from deltaft.app.build import BuiltRun, derived_seed, seed_everything
from deltaft.app.checkpoint import Checkpointer, LoopState
from deltaft.app.config import TrainConfig
from deltaft.app.distributed import DistInfo
from deltaft.app.recipes import LinearProbe, run_wise
from deltaft.app.report import BalanceWarning, epoch_line, plot_run
from deltaft.app.signals import stop_on_interrupt
from deltaft.app.tracking import RunDir
from deltaft.attention import ChannelAttention
from deltaft.engine import (
    Amp,
    NonFiniteLossError,
    ProgressFn,
    TrainingInterrupted,
    evaluate,
    train_one_epoch,
)
from deltaft.objective import TransferObjective

__all__ = ["EpochFn", "Loaders", "TrainingLoop"]

logger = logging.getLogger(__name__)

#: Called with each epoch's metrics row after its checkpoint, plus ``epochs`` (the run's count;
#: see ``TrainingLoop.on_epoch``).
EpochFn = Callable[[dict[str, Any]], None]


@dataclass
class Loaders:
    """The training loader (reseeded every epoch through ``generator`` and ``sampler``) and
    the evaluation loaders by split name."""

    train: DataLoader[Any]
    evaluation: dict[str, DataLoader[Any]]
    generator: torch.Generator
    sampler: DistributedSampler[Any] | None


@dataclass
class TrainingLoop:
    """One run of :func:`~deltaft.app.train.run_training` as built: the epoch loop and the
    summary."""

    cfg: TrainConfig
    run: RunDir
    dist: DistInfo
    built: BuiltRun
    amp: Amp
    channels_last: bool
    objective: TransferObjective
    loaders: Loaders
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    epochs: int
    last_steps: int  # steps of the last epoch (fewer with ``iterations``)
    checkpointer: Checkpointer
    loop: LoopState
    attention: ChannelAttention | None
    attention_seconds: float
    balance: BalanceWarning
    # -- recipes +lpft / +wise: the linear probe and WiSE-FT's theta_0 (None without them)
    probe: LinearProbe | None = None
    theta0: dict[str, Tensor] | None = None
    # Called with each epoch's row after its checkpoint; what it raises ends the run (tuning's
    # pruning).
    on_epoch: EpochFn | None = None

    def _evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        reduce = self.dist.all_reduce_sum if self.dist.enabled else None
        return evaluate(
            model,
            self.loaders.evaluation[split],
            device=self.built.device,
            amp=self.amp,
            channels_last=self.channels_last,
            reduce=reduce,
        )

    def _resume_hint(self) -> str:
        return f"continue it with: deltaft train --out {self.run.path} --resume"

    def fit(self, progress: ProgressFn | None) -> None:
        """Train the remaining epochs; validate and checkpoint after each.

        Raises:
            TrainingInterrupted: Ctrl-C or SIGTERM (see
                :func:`~deltaft.app.signals.stop_on_interrupt`), after saving ``last.pt``.
            NonFiniteLossError: with the epoch ``last.pt`` keeps added to the message.
        """
        with stop_on_interrupt(not self.dist.enabled) as stop:
            trainer = distributed.wrap(self.objective, self.dist, self.built.device)
            while self.loop.epoch < self.epochs:
                if stop():  # a stop while validating or saving: last.pt is this epoch's
                    raise TrainingInterrupted(
                        f"Interrupted after epoch {self.loop.epoch}; "
                        f"{self.run.checkpoint_path()} holds it; {self._resume_hint()}"
                    )
                self._fit_epoch(trainer, progress, stop)

    def _fit_epoch(
        self, trainer: nn.Module, progress: ProgressFn | None, stop: Callable[[], bool]
    ) -> None:
        cfg, dist, loop, loaders = self.cfg, self.dist, self.loop, self.loaders
        loop.epoch += 1
        seed_everything(derived_seed(cfg.seed, "epoch", loop.epoch, dist.rank))
        loaders.generator.manual_seed(derived_seed(cfg.seed, "order", loop.epoch))
        if loaders.sampler is not None:
            loaders.sampler.set_epoch(loop.epoch)
        batches, state = self.checkpointer.epoch_batches(loop, loaders.train)
        try:
            metrics = train_one_epoch(
                trainer,
                batches,
                self.optimizer,
                self.scheduler,
                device=self.built.device,
                amp=self.amp,
                epoch=loop.epoch,
                epochs=self.epochs,
                progress=progress if dist.is_main else None,
                scaler=self.scaler,
                max_steps=self.last_steps if loop.epoch == self.epochs else None,
                channels_last=self.channels_last,
                reduce=dist.all_reduce_sum if dist.enabled else None,
                state=state,
                should_stop=stop,
            )
        except TrainingInterrupted as where:
            self.checkpointer.save_partial(loop, state)
            raise TrainingInterrupted(
                f"Interrupted at {where}; saved {self.run.checkpoint_path()}; {self._resume_hint()}"
            ) from None
        except NonFiniteLossError as error:
            last = self.run.checkpoint_path()
            kept = (
                f"The last good checkpoint, {last} (epoch {loop.epoch - 1}), is kept."
                if last.is_file()
                else "No checkpoint had been written yet."
            )
            raise NonFiniteLossError(f"{error} {kept}") from None
        finally:
            del batches  # stop this epoch's DataLoader workers
        self._end_epoch(metrics)

    def _end_epoch(self, metrics: dict[str, float]) -> None:
        """Log the epoch's row, validate, checkpoint."""
        loop = self.loop
        loop.global_step += int(metrics.pop("steps"))
        self.dist.broadcast_buffers(self.objective.model)  # same BatchNorm statistics everywhere
        row: dict[str, Any] = {"epoch": loop.epoch, "step": loop.global_step}
        row.update({key: metrics.pop(key) for key in ("lr", "seconds", "images_per_s")})
        row["images"] = metrics.pop("images")
        row.update({f"train/{key}": value for key, value in metrics.items()})
        ratio = self.balance(loop.epoch, metrics)
        if ratio is not None:
            row["train/reg_to_task"] = ratio
        if "val" in self.loaders.evaluation:
            val = self._evaluate(self.objective.model, "val")
            row.update({"val/loss": val["loss"], "val/acc": val["acc"]})
        loop.history.append(row)
        logger.info("%s", epoch_line(loop.epoch, self.epochs, row))
        self.checkpointer.save_epoch(loop, row)
        if self.on_epoch is not None:
            self.on_epoch({**row, "epochs": self.epochs})

    def _best_test_accuracy(self, last: float | None) -> float | None:
        """Test accuracy of the ``best.pt`` weights (``last``'s when the last epoch is best)."""
        path = self.run.checkpoint_path("best")
        if last is None or self.loop.best.epoch == self.loop.epoch:
            return last
        if not path.is_file():  # removed while the run trained: no number rather than last's
            logger.warning("%s is missing: the best epoch's test accuracy is not known.", path)
            return None
        # Every process can read best.pt: rank 0 wrote it before the last epoch's collectives.
        best_model = copy.deepcopy(self.objective.model)
        best_model.load_state_dict(self.run.load_checkpoint("best")["model"])
        return self._evaluate(best_model, "test")["acc"]

    def summarize(self) -> dict[str, Any]:
        """Evaluate the last weights on every split, write ``summary.json`` and the figures."""
        model, loop, splits = self.objective.model, self.loop, self.built.splits
        final = {split: self._evaluate(model, split) for split in self.loaders.evaluation}
        val, test = final.get("val", {}), final.get("test", {})
        skipped = self.built.skipped
        summary = {
            "method": self.cfg.method,
            "seed": self.cfg.seed,
            "model": self.cfg.model,
            "data": self.cfg.data,
            "out": str(self.run.path),
            "classes": len(splits.classes),
            "epochs": loop.epoch,
            "steps": loop.global_step,
            "train_images": _size(splits.train),
            "val_images": _size(splits.val),
            "test_images": _size(splits.test),
            "val_accuracy": val.get("acc"),
            "val_loss": val.get("loss"),
            "test_accuracy": test.get("acc"),
            "test_loss": test.get("loss"),
            "best_epoch": loop.best.epoch,
            "best_val_accuracy": loop.best.val_accuracy,
            "best_test_accuracy": self._best_test_accuracy(test.get("acc")),
            "seconds": self.checkpointer.seconds(loop),
            "attention_seconds": self.attention_seconds,
            "layers": self.checkpointer.meta["layers"],
            "skipped": {"count": len(skipped), "files": skipped},
            "config": self.cfg.to_dict(),
        }
        self._recipes(summary)
        self.run.write_summary(summary)
        if self.dist.is_main:
            plot_run(loop.history, self.attention, self.run)
        self.dist.barrier()
        return summary

    def _recipes(self, summary: dict[str, Any]) -> None:
        """+lpft / +wise: the probe in ``summary``; WiSE-FT's weights chosen on validation,
        saved as ``checkpoints/wise.pt``, and its accuracies made the run's headline (the
        fine-tuned network's kept under ``finetuned``)."""
        if self.probe is not None:
            summary["probe"] = self.probe.summary(self.cfg)
        if self.theta0 is None:
            return
        wise = run_wise(
            self.cfg,
            self.built,
            self.objective.model,
            self.theta0,
            self._evaluate,
            has_test="test" in self.loaders.evaluation,
            sync=self.dist.broadcast_buffers if self.dist.enabled else None,
        )
        chosen = f"{wise.summary['alpha']:g}"
        saved = {"model": wise.state, "epoch": self.loop.epoch, "wise_alpha": wise.summary["alpha"]}
        self.run.save_checkpoint({**self.checkpointer.meta, **saved}, "wise")
        keys = ("val_accuracy", "val_loss", "test_accuracy", "test_loss")
        summary["finetuned"] = {key: summary[key] for key in keys}
        summary["val_accuracy"] = wise.summary["val_accuracy"][chosen]
        summary["val_loss"] = wise.summary["val_loss"][chosen]
        summary["test_accuracy"] = wise.summary["test_accuracy"]
        summary["test_loss"] = wise.summary["test_loss"]
        summary["wise"] = wise.summary


def _size(dataset: Dataset[Any] | None) -> int | None:
    return None if dataset is None else len(dataset)  # type: ignore[arg-type]
