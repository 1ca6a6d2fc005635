"""Checkpoints of a training run: what they hold, when they are written, and how a run resumes.

:class:`Checkpointer` is the one owner of the checkpoint policy:

* after every epoch, ``best.pt`` (when the epoch is the best so far by validation accuracy, see
  :class:`Best`) and then ``last.pt``, then the epoch's line of ``metrics.jsonl``;
* on a stop in the middle of an epoch, ``last.pt`` with the finished epochs plus the epoch's
  running totals and the RNG states after its last step (``partial``);
* on resume, model, optimizer, schedule, scaler, RNG states, epoch, step, history and best epoch
  are restored from ``last.pt``; a partial epoch is replayed by :meth:`Checkpointer.epoch_batches`.

The files themselves (atomic writes, ``weights_only`` loading) are :mod:`deltaft.app.tracking`'s.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deltaft._utils import first_line
from deltaft.app.config import RUNTIME_KEYS, TrainConfig
from deltaft.app.errors import SettingError
from deltaft.app.tracking import RunDir
from deltaft.engine import EpochState

__all__ = [
    "Best",
    "Checkpointer",
    "LoopState",
    "capture_rng_state",
    "check_best",
    "check_resume_state",
    "open_run",
    "restore_rng_state",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# RNG states as tensors and plain values, so that weights_only loading accepts them
# ------------------------------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """The global Python, NumPy, torch (and initialised CUDA) RNG states as plain values."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return {
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),  # 625 values < 2**32
            "gauss_next": gauss_next,
        },
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),  # (624,) uint32 values
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": list(cuda),
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states only when as many devices exist)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["name"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)


# ------------------------------------------------------------------------------------------------
# Loop state
# ------------------------------------------------------------------------------------------------
@dataclass
class Best:
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


@dataclass
class LoopState:
    """Where the epoch loop is: what ``last.pt`` restores besides the training objects."""

    epoch: int = 0  # finished epochs (the current one while it runs)
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl rows
    best: Best = field(default_factory=Best)
    seconds_before: float = 0.0  # training time of the runs this one resumes
    partial: dict[str, Any] | None = None  # an interrupted epoch to continue


# ------------------------------------------------------------------------------------------------
# What a checkpoint to resume from must hold
# ------------------------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_resume_state(state: Mapping[str, Any], path: Path) -> None:
    """Refuse a ``last.pt`` that lacks a field or holds an impossible value, before any of it
    is used: a tampered, truncated-by-hand or foreign checkpoint is one clear line, never a
    ``KeyError`` in the middle of restoring it.

    Raises:
        ValueError: the first problem found, naming the field and ``path``.
    """

    def refuse(what: str) -> ValueError:
        return ValueError(
            f"{path} cannot be resumed: {what}. Restore the run's own checkpoint, or start a "
            "new run in another folder."
        )

    kinds = {
        "config": dict, "model": dict, "optimizer": dict, "scheduler": dict, "rng": dict,
        "best": dict, "metrics": list, "model_fingerprint": str,
    }  # fmt: skip
    for key, kind in kinds.items():
        if not isinstance(state.get(key), kind):
            got = "missing" if key not in state else type(state[key]).__name__
            raise refuse(f"its {key!r} is {got}, expected a {kind.__name__}")
    for key in ("epoch", "epochs", "global_step"):
        if not _is_int(state.get(key)) or state[key] < 0:
            raise refuse(f"its {key!r} is {state.get(key)!r}, expected an integer >= 0")
    epoch = state["epoch"]
    if epoch > state["epochs"]:
        raise refuse(f"epoch {epoch} is after the run's last epoch {state['epochs']}")
    if len(state["metrics"]) != epoch:
        raise refuse(f"it holds {len(state['metrics'])} metrics rows for {epoch} epoch(s)")
    missing = [key for key in ("python", "numpy", "torch") if key not in state["rng"]]
    if missing:
        raise refuse(f"its RNG state lacks {', '.join(missing)}")
    best = state["best"]
    if not (_is_int(best.get("epoch")) and 0 <= best["epoch"] <= epoch):
        raise refuse(f"its best epoch {best.get('epoch')!r} is not one of epochs 0..{epoch}")
    partial = state.get("partial")
    if partial is not None and not (
        isinstance(partial, dict)
        and partial.get("epoch") == epoch + 1
        and _is_int(partial.get("step"))
        and partial["step"] >= 0
    ):
        raise refuse(f"its interrupted epoch {partial!r:.80} does not follow epoch {epoch}")


def _settings(config: Any) -> dict[str, Any] | None:
    """A stored configuration without the runtime settings (a resume may change those)."""
    if not isinstance(config, dict):
        return None
    return {key: value for key, value in config.items() if key not in RUNTIME_KEYS}


def check_best(run: RunDir, last: Mapping[str, Any], best: Best) -> None:
    """Refuse a resume whose ``best.pt`` is missing or is not the best epoch ``last.pt``
    records (same run, same epoch, or the next one when the run stopped between writing
    ``best.pt`` and ``last.pt``): the summary would report another model's test accuracy as
    the best's.

    Raises:
        ValueError: naming ``best.pt`` and what is wrong with it.
    """
    if best.epoch == 0:  # no epoch finished yet: no best.pt to expect
        return
    path = run.checkpoint_path("best")
    if not path.is_file():
        raise ValueError(
            f"{path} (the weights of epoch {best.epoch}, the best by validation accuracy) is "
            "missing; restore it, or start a new run in another folder."
        )
    state = run.load_checkpoint("best")
    # best.pt is written before last.pt: a run stopped between the two has a best.pt of the
    # epoch after last.pt's, which the resumed run trains again (to the same weights).
    epochs = (best.epoch, int(last["epoch"]) + 1)
    same = (
        state.get("epoch") in epochs
        and state.get("model_fingerprint") == last["model_fingerprint"]
        and _settings(state.get("config")) == _settings(last["config"])
        and isinstance(state.get("model"), dict)
    )
    if not same:
        raise ValueError(
            f"{path} is not this run's best epoch (it holds epoch {state.get('epoch')!r}, "
            f"{run.checkpoint_path()} names epoch {best.epoch}); restore the run's own best.pt, "
            "or start a new run in another folder."
        )


# ------------------------------------------------------------------------------------------------
# Opening a run directory
# ------------------------------------------------------------------------------------------------
def open_run(run: RunDir, cfg: TrainConfig) -> dict[str, Any] | None:
    """Claim the run directory (:meth:`RunDir.claim`: one writer per directory) and check that
    it may be used; the checkpoint to resume from, if any. The caller calls ``run.release()``.

    Raises:
        SettingError: a new run where one exists, a directory that another process holds or
            that cannot be written, or a resume with changed settings.
    """
    if not cfg.resume:
        run.check_new()  # before the claim: a refused directory is left untouched
        run.claim()
        run.check_new()  # again: another process may have written it meanwhile
        return None
    run.claim()  # before anything is read: another writer may be mid-write
    run.remove_stale_temporaries()
    last = run.checkpoint_path("last")
    if last.is_file():
        state = run.load_checkpoint("last")
        check_resume_state(state, last)
        changed = cfg.differences(state["config"])
        if changed:
            listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise SettingError(
                f"Cannot resume {run.path} with changed settings ({listed}); resume with the "
                f"settings of {run.config_path}, or start a new {{out}}."
            )
        return state
    if run.holds_run():
        logger.warning("%s has no checkpoint yet: starting it again from epoch 1.", run.path)
    else:
        run.check_new()
        logger.info("Nothing to resume in %s: starting a new run.", run.path)
    return None


# ------------------------------------------------------------------------------------------------
# The checkpointer
# ------------------------------------------------------------------------------------------------
class Checkpointer:
    """Saves and restores one training run (see the module docstring for the policy).

    Args:
        run: the run directory (``write=False`` on non-zero ranks: saves are no-ops).
        meta: what every checkpoint carries besides weights, enough to rebuild and evaluate
            the model (config, classes, head, source fingerprint, layers, image size, mean, std).
        model: the target network whose ``state_dict`` is saved.
        optimizer, scheduler, scaler: saved in, and restored from, ``last.pt``.
        epochs: the run's number of epochs (recorded in ``last.pt``).
        started: ``time.perf_counter()`` when this process started the run.
        extra: trained modules outside ``model`` (the kept source head of ``cotuning`` and
            ``lwf``), by name: saved in, and restored from, ``last.pt``'s ``extra`` only (never
            in ``best.pt``, which evaluation reads).
    """

    def __init__(
        self,
        run: RunDir,
        meta: Mapping[str, Any],
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler | None,
        epochs: int,
        started: float,
        extra: Mapping[str, nn.Module] | None = None,
    ) -> None:
        self.extra = dict(extra or {})
        self.run, self.meta = run, dict(meta)
        self.model, self.optimizer = model, optimizer
        self.scheduler, self.scaler = scheduler, scaler
        self.epochs, self.started = epochs, started

    def begin(self, cfg: TrainConfig, resume_state: Mapping[str, Any] | None) -> LoopState:
        """Write a new run's first files, or restore everything ``last.pt`` holds (and write
        ``config.yaml`` again, with ``resume`` off, if it was removed)."""
        if resume_state is None:
            self.run.write_config(cfg.to_yaml())
            self.run.reset_metrics()
            return LoopState()
        loop = self._restore(resume_state)
        if self.run.write and not self.run.config_path.is_file():
            logger.warning("%s was missing: written again.", self.run.config_path)
            self.run.write_config(dataclasses.replace(cfg, resume=False).to_yaml())
        self.run.reset_metrics(loop.history)  # drops a row written after the checkpoint
        partial = loop.partial
        at = f", at step {partial['step']} of epoch {partial['epoch']}" if partial else ""
        logger.info(
            "Resuming %s after epoch %d of %d%s.", self.run.path, loop.epoch, self.epochs, at
        )
        return loop

    def _restore(self, state: Mapping[str, Any]) -> LoopState:
        """Load ``state`` (checked by :func:`check_resume_state`) into the training objects."""
        path = self.run.checkpoint_path()
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            for name, module in self.extra.items():
                module.load_state_dict(state["extra"][name])
            restore_rng_state(state["rng"])
            best = Best(**state["best"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as error:
            raise ValueError(
                f"{path} does not fit the model and optimizer this run builds "
                f"({first_line(error)[:200]}); restore the run's own checkpoint, or start a new "
                "run in another folder."
            ) from None
        check_best(self.run, state, best)
        partial = state.get("partial")
        return LoopState(
            epoch=int(state["epoch"]),
            global_step=int(state["global_step"]),
            history=list(state["metrics"]),
            best=best,
            seconds_before=float(state.get("seconds", 0.0)),
            partial=None if partial is None else {**partial, "rng": state["rng"]},
        )

    def seconds(self, loop: LoopState) -> float:
        """Training time so far, the resumed runs' included."""
        return loop.seconds_before + time.perf_counter() - self.started

    def _last_state(self, loop: LoopState, epoch: int) -> dict[str, Any]:
        """Everything ``last.pt`` holds after ``epoch`` finished epochs."""
        return {
            **self.meta,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": epoch,
            "epochs": self.epochs,
            "global_step": loop.global_step,
            "rng": capture_rng_state(),
            "best": dataclasses.asdict(loop.best),
            "metrics": loop.history,
            "seconds": self.seconds(loop),
            **({"extra": {k: m.state_dict() for k, m in self.extra.items()}} if self.extra else {}),
        }

    def save_epoch(self, loop: LoopState, row: Mapping[str, Any]) -> None:
        """After epoch ``loop.epoch``: ``best.pt`` (when it is the best), ``last.pt``, then the
        metrics line, so that ``metrics.jsonl`` never runs ahead of ``last.pt``."""
        if loop.best.update(loop.epoch, row.get("val/acc")):
            best = {"model": self.model.state_dict(), "epoch": loop.epoch}
            self.run.save_checkpoint({**self.meta, **best, **dataclasses.asdict(loop.best)}, "best")
        self.run.save_checkpoint(self._last_state(loop, loop.epoch), "last")
        self.run.append_metrics(row)

    def save_partial(self, loop: LoopState, state: EpochState) -> None:
        """``last.pt`` in the middle of epoch ``loop.epoch``: the finished epochs, plus the
        epoch's running totals (``partial``) and the RNG states after its last step done."""
        partial = {"epoch": loop.epoch, **dataclasses.asdict(state)}
        last = self._last_state(loop, loop.epoch - 1)
        self.run.save_checkpoint({**last, "partial": partial})

    @staticmethod
    def epoch_batches(loop: LoopState, loader: Iterable[Any]) -> tuple[Iterator[Any], EpochState]:
        """Epoch ``loop.epoch``'s batches and totals; an interrupted epoch continues after its
        last step (and ``loop.partial`` is consumed).

        The data order depends only on ``(seed, epoch)``, so skipping the batches the
        interrupted run trained on (they are loaded, not trained on) and restoring the RNG
        states it saved puts the run exactly where it stopped.
        """
        batches = iter(loader)
        partial, loop.partial = loop.partial, None
        if partial is None or partial["epoch"] != loop.epoch:
            return batches, EpochState()
        for _ in range(partial["step"]):
            next(batches)
        restore_rng_state(partial["rng"])
        fields = {f.name: partial[f.name] for f in dataclasses.fields(EpochState)}
        return batches, EpochState(**fields)
