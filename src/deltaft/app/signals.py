"""Stops asked from outside: Ctrl-C (SIGINT), and SIGTERM / SIGHUP (docker, Slurm, systemd, a
closed terminal), which :func:`terminate_as_interrupt` turns into Ctrl-C.

During training (:func:`stop_on_interrupt`) the first such signal asks for a clean stop after
the current step, so that the run can save where it is; a second one stops at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

__all__ = ["STOP_SIGNALS", "stop_on_interrupt", "terminate_as_interrupt"]

# The signals that ask a run to stop: Ctrl-C, then those that terminate_as_interrupt converts.
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise ``KeyboardInterrupt`` as Ctrl-C does, so
    that a run stopped by a job scheduler saves its progress and says how to continue.

    Only in the main thread, and only for a signal that has its default handler (a signal the
    caller ignores, e.g. SIGHUP under ``nohup``, stays ignored). The command line calls it; a
    library caller keeps its own handlers.
    """
    if not _main_thread():
        yield
        return
    previous = {
        number: signal.getsignal(number)
        for number in STOP_SIGNALS
        if number != signal.SIGINT and signal.getsignal(number) is signal.SIG_DFL
    }
    for number in previous:
        signal.signal(number, signal.default_int_handler)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextlib.contextmanager
def stop_on_interrupt(enabled: bool) -> Iterator[Callable[[], bool]]:
    """Within the block, a first Ctrl-C (SIGINT), or a SIGTERM / SIGHUP that
    :func:`terminate_as_interrupt` made an interrupt, only asks training to stop after the
    current step, so that it can save where it is; a second one raises ``KeyboardInterrupt``
    at once.

    Yields whether a stop was asked. Only in the main thread, for the signals whose handler is
    Python's ``KeyboardInterrupt`` (``signal.default_int_handler``), and ``enabled`` (a single
    process: distributed ranks would stop at different steps).

    Example:
        >>> with stop_on_interrupt(True) as stop:
        ...     stop()
        False
    """
    asked = threading.Event()
    previous = {
        number: signal.getsignal(number)
        for number in STOP_SIGNALS
        if signal.getsignal(number) is signal.default_int_handler
    }
    if not (enabled and _main_thread() and previous):
        yield asked.is_set
        return

    def restore() -> None:
        for number, handler in previous.items():
            signal.signal(number, handler)

    def handler(signum: int, frame: FrameType | None) -> None:
        asked.set()
        restore()  # the next signal interrupts at once

    for number in previous:
        signal.signal(number, handler)
    try:
        yield asked.is_set
    finally:
        restore()
