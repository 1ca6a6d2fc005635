"""One training epoch and one evaluation pass, with every dependency passed in explicitly.

The loop is the same for every method: it calls ``objective(x, y)``, back-propagates
``out["loss"]`` and averages every scalar the objective returns (``loss``, ``task_loss``,
``reg/...``). It never looks at the method's name.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from deltaft._utils import logits_of as _logits

__all__ = [
    "Amp",
    "EpochState",
    "NonFiniteLossError",
    "Progress",
    "ProgressFn",
    "ReduceFn",
    "TrainingInterrupted",
    "autocast",
    "evaluate",
    "train_one_epoch",
]

logger = logging.getLogger(__name__)

Amp = Literal["none", "bf16", "fp16"]
ReduceFn = Callable[[Tensor], Tensor]
"""Sums a 1-D tensor over processes (``torch.distributed.all_reduce``); identity when alone."""


class NonFiniteLossError(RuntimeError):
    """A loss part became NaN or infinite: training diverged."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped between two steps because ``should_stop`` asked for it (Ctrl-C)."""


@dataclass
class EpochState:
    """Running totals of one epoch, updated after every step: what a mid-epoch checkpoint keeps.

    Attributes:
        step: steps done in this epoch.
        sums: per loss part, the sum over those steps of the step's value.
        correct: correctly classified training images so far.
        images: training images so far.
        seconds: training time of this epoch so far.
        lr: learning rate of the first parameter group at the last step done.
    """

    step: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    correct: int = 0
    images: int = 0
    seconds: float = 0.0
    lr: float | None = None


@dataclass(frozen=True)
class Progress:
    """Where an epoch stands, handed to the progress callback after every step.

    Attributes:
        epoch: 1-based epoch number.
        epochs: total epochs of the run.
        step: 1-based step within the epoch.
        steps: steps this epoch will run.
        metrics: running means of the epoch so far (every loss part, ``acc`` as a fraction).
        images_per_s: training throughput of this epoch so far.
        eta_s: estimated seconds left in this epoch.
        lr: learning rate of the first parameter group at this step.
    """

    epoch: int
    epochs: int
    step: int
    steps: int
    metrics: Mapping[str, float]
    images_per_s: float
    eta_s: float
    lr: float


ProgressFn = Callable[[Progress], None]


def autocast(device: torch.device, amp: Amp) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` for ``bf16``/``fp16`` on CUDA; a no-op otherwise (CPU, ``none``)."""
    if amp == "none" or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def _to_device(batch: Any, device: torch.device, channels_last: bool) -> tuple[Tensor, Tensor]:
    x, y = batch
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def _scalar_parts(out: Mapping[str, Any]) -> dict[str, Tensor]:
    """Every 0-dim tensor of the objective's output, detached, in the objective's order."""
    if "loss" not in out:
        raise KeyError(f"The objective must return a 'loss' entry; got {sorted(out)}.")
    return {
        key: value.detach()
        for key, value in out.items()
        if isinstance(value, Tensor) and value.dim() == 0
    }


def _limited(loader: Iterable[Any], max_steps: int | None) -> Iterator[Any]:
    for step, batch in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            return
        yield batch


def train_one_epoch(
    objective: nn.Module,
    loader: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    device: torch.device,
    amp: Amp = "none",
    epoch: int = 1,
    epochs: int = 1,
    progress: ProgressFn | None = None,
    scaler: torch.amp.GradScaler | None = None,
    max_steps: int | None = None,
    channels_last: bool = False,
    reduce: ReduceFn | None = None,
    state: EpochState | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """Train ``objective`` for one pass over ``loader`` (or ``max_steps`` steps).

    Per step: ``out = objective(x, y)`` (under :func:`autocast`), a check that every scalar of
    ``out`` is finite, ``out["loss"].backward()`` (through ``scaler`` when given), the optimizer
    step, then ``scheduler.step()``: the schedule is per step.

    Args:
        objective: a module whose ``forward(x, y)`` returns a dict with ``loss``, optionally
            ``logits`` and any other scalar parts (e.g. a
            :class:`~deltaft.objective.TransferObjective`, possibly wrapped in DDP). It is put in
            train mode.
        loader: ``(x, y)`` batches.
        optimizer, scheduler: stepped once per batch.
        device: where the batches go.
        amp: ``none``, ``bf16`` or ``fp16`` (CUDA only; ignored elsewhere).
        epoch, epochs: for the progress callback and error messages (1-based).
        progress: called after every step with a :class:`Progress`.
        scaler: a ``GradScaler`` for ``fp16``.
        max_steps: stop after this many steps (the last epoch of an ``iterations`` budget).
        channels_last: convert images to NHWC.
        reduce: sums a tensor over processes, for distributed training; the returned metrics are
            then the means over every process.
        state: updated in place after every step. To continue an interrupted epoch, pass the
            state it left and a ``loader`` positioned after its ``state.step`` batches (steps
            are then numbered from ``state.step + 1`` and ``max_steps`` counts the whole epoch).
        should_stop: asked after every step but the epoch's last; when it returns ``True``,
            :class:`TrainingInterrupted` is raised and ``state`` holds the epoch so far.

    Returns:
        The epoch's means of every scalar part (``loss``, ``task_loss``, ``reg/...``), ``acc``
        (top-1 accuracy of the training batches, a fraction in [0, 1]; present when ``out`` has
        ``logits``),
        ``lr`` (of the first parameter group, at the last step), ``steps``, ``images``,
        ``seconds`` and ``images_per_s``.

    Raises:
        NonFiniteLossError: a part was NaN or infinite; the message names it, the epoch and step.
        TrainingInterrupted: ``should_stop`` returned ``True``.
        ValueError: the loader yielded no batch.
    """
    objective.train()
    steps = len(loader) if hasattr(loader, "__len__") else 0  # type: ignore[arg-type]
    if max_steps is not None:
        steps = min(steps, max_steps) if steps else max_steps
    state = state if state is not None else EpochState()
    sums = state.sums
    remaining = None if max_steps is None else max_steps - state.step
    if state.lr is None:
        state.lr = float(optimizer.param_groups[0]["lr"])
    out: Mapping[str, Any] = {}
    start = time.perf_counter() - state.seconds
    for step, batch in enumerate(_limited(loader, remaining), start=state.step + 1):
        x, y = _to_device(batch, device, channels_last)
        with autocast(device, amp):
            out = objective(x, y)
        parts = _scalar_parts(out)
        logits = out.get("logits")
        stats = [value.float() for value in parts.values()]
        if isinstance(logits, Tensor):
            stats.append((logits.detach().argmax(dim=1) == y).sum().float())
        values = torch.stack(stats).tolist()  # the one host sync of the step
        part_values = dict(zip(parts, values, strict=False))
        _check_finite(part_values, epoch, step, steps)
        optimizer.zero_grad(set_to_none=True)
        loss = out["loss"]
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        state.lr = float(optimizer.param_groups[0]["lr"])
        if scheduler is not None:
            scheduler.step()
        for key, value in part_values.items():
            sums[key] = sums.get(key, 0.0) + value
        if isinstance(logits, Tensor):
            state.correct += int(values[-1])
        state.images += int(y.shape[0])
        state.step = step
        state.seconds = elapsed = time.perf_counter() - start
        if progress is not None:
            running = {key: value / step for key, value in sums.items()}
            if isinstance(logits, Tensor):
                running["acc"] = state.correct / state.images
            progress(
                Progress(
                    epoch=epoch,
                    epochs=epochs,
                    step=step,
                    steps=max(steps, step),
                    metrics=running,
                    images_per_s=state.images / elapsed if elapsed > 0 else 0.0,
                    eta_s=elapsed / step * max(steps - step, 0),
                    lr=state.lr,
                )
            )
        if should_stop is not None and step < steps and should_stop():
            raise TrainingInterrupted(f"epoch {epoch}, step {step}/{steps}")
    if state.step == 0:
        raise ValueError(
            "The training loader yielded no batch; the training set is empty or smaller than "
            "one batch with drop_last."
        )
    seconds = time.perf_counter() - start
    step = state.step
    counts = {"steps": float(step), "images": float(state.images), "correct": float(state.correct)}
    totals = _reduce({**sums, **counts}, reduce)
    metrics = {key: totals[key] / totals["steps"] for key in sums}
    if "logits" in out:
        metrics["acc"] = totals["correct"] / totals["images"]
    metrics.update(
        lr=state.lr,
        steps=float(step),
        images=totals["images"],
        seconds=seconds,
        images_per_s=totals["images"] / seconds if seconds > 0 else 0.0,
    )
    return metrics


def _check_finite(values: Mapping[str, float], epoch: int, step: int, steps: int) -> None:
    bad = [key for key, value in values.items() if not math.isfinite(value)]
    if bad:
        parts = [key for key in bad if key != "loss"] or bad  # name the cause, not just the sum
        shown = ", ".join(f"{key}={value:.6g}" for key, value in values.items())
        raise NonFiniteLossError(
            f"Non-finite {', '.join(parts)} at epoch {epoch}, step {step}/{steps} "
            f"({shown}); training diverged: lower --lr or --alpha, or use --amp none."
        )


def _reduce(values: dict[str, float], reduce: ReduceFn | None) -> dict[str, float]:
    """Sum ``values`` over processes (one ``all_reduce`` of a float64 tensor)."""
    if reduce is None:
        return values
    total = reduce(torch.tensor(list(values.values()), dtype=torch.float64))
    return dict(zip(values, total.tolist(), strict=True))


def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    device: torch.device,
    amp: Amp = "none",
    channels_last: bool = False,
    reduce: ReduceFn | None = None,
) -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy of ``model`` over ``loader``, in eval mode.

    The model's train/eval mode is restored afterwards. With ``reduce`` (distributed), each
    process evaluates its shard and the sums are combined. A non-finite loss (infinite or NaN
    logits) is logged as a warning: accuracy computed from such logits means little.

    Returns:
        ``loss`` (mean cross-entropy per image), ``acc`` (top-1, a fraction in [0, 1]) and
        ``images``.

    Raises:
        ValueError: the loader yielded no image.
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    images = 0
    try:
        with torch.inference_mode():
            for batch in loader:
                x, y = _to_device(batch, device, channels_last)
                with autocast(device, amp):
                    logits = _logits(model(x))
                loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
                correct += (logits.argmax(dim=1) == y).sum().double()
                images += int(y.shape[0])
    finally:
        model.train(was_training)
    totals = _reduce(
        {"loss": float(loss_sum), "correct": float(correct), "images": float(images)}, reduce
    )
    if totals["images"] == 0:
        raise ValueError("The evaluation loader yielded no image.")
    if not math.isfinite(totals["loss"]):
        logger.warning(
            "The evaluation loss is %s over %d images: the model gave infinite or NaN logits, so "
            "its accuracy means little; check the weights, or lower --lr or use --amp none.",
            totals["loss"] / totals["images"],
            int(totals["images"]),
        )
    return {
        "loss": totals["loss"] / totals["images"],
        "acc": totals["correct"] / totals["images"],
        "images": totals["images"],
    }
