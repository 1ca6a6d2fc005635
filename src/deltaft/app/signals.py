"""Ctrl-C during training: the first one asks for a clean stop, the second one stops at once."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

__all__ = ["stop_on_sigint"]


@contextlib.contextmanager
def stop_on_sigint(enabled: bool) -> Iterator[Callable[[], bool]]:
    """Within the block, a first Ctrl-C (SIGINT) only asks training to stop after the current
    step, so that it can save where it is; a second one raises ``KeyboardInterrupt`` at once.

    Yields whether a stop was asked. Only in the main thread, where SIGINT has Python's default
    handler, and ``enabled`` (a single process: distributed ranks would stop at different steps).

    Example:
        >>> with stop_on_sigint(True) as stop:
        ...     stop()
        False
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
