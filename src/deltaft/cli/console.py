"""Console output of the command line: log lines and progress on stderr.

One handler on the ``deltaft`` logger writes ``deltaft: warning: ...`` (and plain info lines) to
the current ``sys.stderr`` through :func:`tqdm.tqdm.write`, so that a log line never breaks a
progress bar. :class:`ProgressPrinter` shows training progress: a tqdm bar per epoch on a
terminal, plain lines every ``every`` steps elsewhere.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from tqdm import tqdm

from deltaft.engine import Progress

__all__ = ["ProgressPrinter", "configure_logging", "duration"]

PROG = "deltaft"
_HANDLER_TAG = "_deltaft_cli_handler"


class _StderrHandler(logging.Handler):
    """Writes each record to the *current* ``sys.stderr`` (so captured streams work), above bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise
            self.handleError(record)


class _Formatter(logging.Formatter):
    """``deltaft: warning: message`` for warnings and errors, the bare message below."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{PROG}: {record.levelname.lower()}: {message}"
        return message


def configure_logging(level: int) -> None:
    """One handler on the ``deltaft`` logger (replacing an earlier one of this function)."""
    logger = logging.getLogger(PROG)
    for handler in list(logger.handlers):
        if getattr(handler, _HANDLER_TAG, False):
            logger.removeHandler(handler)
    handler = _StderrHandler()
    setattr(handler, _HANDLER_TAG, True)
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    logger.setLevel(level)


def duration(seconds: float) -> str:
    """``M:SS`` or ``H:MM:SS``.

    Example:
        >>> duration(65), duration(3725)
        ('1:05', '1:02:05')
    """
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressPrinter:
    """Prints training progress to stderr: a tqdm bar on a terminal, plain lines elsewhere.

    The engine calls it with a :class:`~deltaft.engine.Progress` after every step.

    Args:
        stream: where to write; default the current ``sys.stderr``.
        every: in plain mode, print every ``every`` steps (and at the end of each epoch).
        tty: force bar (``True``) or plain (``False``) mode; default ``stream.isatty()``.
        min_interval: in bar mode, redraw at most this often (seconds).
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        every: int = 20,
        tty: bool | None = None,
        min_interval: float = 0.1,
    ) -> None:
        self._stream = stream
        self.every = max(int(every), 1)
        self._tty = tty
        self.min_interval = min_interval
        self._bar: tqdm[None] | None = None
        self._epoch = 0

    @property
    def stream(self) -> TextIO:
        """The stream written to."""
        return self._stream if self._stream is not None else sys.stderr

    @property
    def tty(self) -> bool:
        """Whether progress is a bar (the stream is a terminal, or ``tty=True``)."""
        if self._tty is not None:
            return self._tty
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    @staticmethod
    def metrics(p: Progress) -> str:
        """Running loss parts, accuracy, speed, lr and ETA of the run: ``loss 1.5, ... | ETA``."""
        parts = [f"{k} {v:.4g}" for k, v in p.metrics.items() if k != "acc"]
        if "acc" in p.metrics:
            parts.append(f"acc {100 * p.metrics['acc']:.1f}%")
        return (
            f"{', '.join(parts)} | {p.images_per_s:.1f} img/s | lr {p.lr:.3g} | "
            f"ETA {duration(p.eta_s)}"
        )

    @classmethod
    def format(cls, p: Progress) -> str:
        """One plain progress line: epoch, step, then :meth:`metrics`."""
        return f"epoch {p.epoch}/{p.epochs} step {p.step}/{p.steps} | {cls.metrics(p)}"

    def close(self) -> None:
        """End the current bar, if any (before an error line, say)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __call__(self, p: Progress) -> None:
        end = p.step >= p.steps
        if self.tty:
            self._draw(p)
            if end:
                self.close()
        elif end or p.step % self.every == 0:
            self.stream.write(self.format(p) + "\n")
            self.stream.flush()

    def _draw(self, p: Progress) -> None:
        """Update (or start) the epoch's bar; the run's metrics follow the step count."""
        bar = self._bar
        if bar is None or (p.epoch, p.steps) != (self._epoch, bar.total) or p.step < bar.n:
            self.close()
            self._epoch = p.epoch
            bar = self._bar = tqdm(
                total=p.steps,
                file=self.stream,
                mininterval=self.min_interval,
                miniters=1,
                dynamic_ncols=True,
                bar_format=f"epoch {p.epoch}/{p.epochs} " + "{bar:20} {n_fmt}/{total_fmt} | {desc}",
            )
        bar.set_description_str(self.metrics(p), refresh=False)
        bar.update(p.step - bar.n)
