"""What a training run reports besides its files: the epoch log line, the regularizer-balance
warning, and the figures."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from deltaft.app.config import TrainConfig
from deltaft.app.tracking import RunDir
from deltaft.attention import ChannelAttention

__all__ = ["BalanceWarning", "epoch_line", "plot_run", "reg_to_task"]

logger = logging.getLogger(__name__)

_DOMINANT_RATIO = 10.0  # the regularizer exceeds the task loss this many times: it may dominate


def _format_metrics(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())


def epoch_line(epoch: int, epochs: int, row: Mapping[str, Any]) -> str:
    """The log line of one epoch's ``metrics.jsonl`` row.

    Example:
        >>> row = {"train/loss": 0.5, "train/acc": 0.75, "lr": 0.01, "seconds": 2.0,
        ...        "images_per_s": 16.0}
        >>> epoch_line(1, 3, row)
        'epoch 1/3: loss 0.5; train acc 75.00%; lr 0.01; 2.0 s, 16.0 img/s'
    """
    parts = {k[len("train/") :]: v for k, v in row.items() if k.startswith("train/")}
    acc = parts.pop("acc", None)
    text = f"epoch {epoch}/{epochs}: {_format_metrics(parts)}"
    if acc is not None:
        text += f"; train acc {100 * acc:.2f}%"
    if row.get("val/acc") is not None:
        text += f"; val acc {100 * row['val/acc']:.2f}% (loss {row['val/loss']:.4g})"
    return text + f"; lr {row['lr']:.3g}; {row['seconds']:.1f} s, {row['images_per_s']:.1f} img/s"


def reg_to_task(metrics: Mapping[str, float]) -> float | None:
    """``sum(reg/...) / task_loss`` (``inf`` when ``task_loss`` is 0; ``None`` without a
    regularizer part or a task loss).

    Example:
        >>> reg_to_task({"task_loss": 2.0, "reg/delta": 3.0, "reg/head": 1.0})
        2.0
    """
    reg = [value for key, value in metrics.items() if key.startswith("reg/")]
    task = metrics.get("task_loss")
    if not reg or task is None:
        return None
    return sum(reg) / task if task > 0 else math.inf


class BalanceWarning:
    """Warns once per run when the regularizer dominates *and* holds training back: the epoch's
    regularizer is more than 10 times its task loss and the task loss did not fall from the
    previous epoch.

    A large ratio alone predicts nothing: DELTA's penalty sums over channels and pixels, so it
    is often many times the task loss while the task loss falls as it should (the demo's own
    settings; most runs from random weights). A task loss that stops falling while the
    regularizer dominates is what a too-large ``alpha`` does, and the warning says so, with a
    smaller value to try.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        self.alpha, self.beta = cfg.alpha, cfg.beta
        self.strength, self.setting = "alpha", f"--alpha {cfg.alpha:g} (--beta {cfg.beta:g})"
        if cfg.spec.base == "lwf":  # its strength is another setting (no beta term)
            self.alpha = cfg.lwf_trade_off
            self.strength, self.setting = "lwf-trade-off", f"--lwf-trade-off {self.alpha:g}"
        # Co-Tuning's loss never falls below the entropy of the relationship (about log K,
        # K source classes): its ratio says nothing about harm, so it never warns.
        self.reported = cfg.spec.base == "cotuning"
        self._previous: float | None = None  # the previous epoch's task loss

    def __call__(self, epoch: int, metrics: Mapping[str, float]) -> float | None:
        """The epoch's :func:`reg_to_task` ratio; a warning the first time it predicts harm."""
        ratio = reg_to_task(metrics)
        task = metrics.get("task_loss")
        previous, self._previous = self._previous, task
        stalled = previous is not None and task is not None and not task < previous
        if ratio is not None and ratio > _DOMINANT_RATIO and stalled and not self.reported:
            self.reported = True
            logger.warning(
                "epoch %d: the task loss stopped falling (%.4g -> %.4g) while the regularizer is "
                "%.3g times it: %s holds the weights too close to the source "
                "to fit the new classes; try --%s %g. metrics.jsonl logs the ratio of every "
                "epoch (train/reg_to_task).",
                epoch,
                previous,
                task,
                ratio,
                self.setting,
                self.strength,
                self.alpha / 10,
            )
        return ratio


def plot_run(
    rows: Sequence[Mapping[str, Any]], attention: ChannelAttention | None, run: RunDir
) -> None:
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
