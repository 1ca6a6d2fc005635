"""Job processes of ``compare --jobs`` and ``tune --jobs``: spawned, each with its share of the
torch threads, its log records handed to this process, dying with it, Ctrl-C left to it.

:func:`job_pool` is the one way both commands start and end them.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
from collections.abc import Iterator
from typing import Any

__all__ = ["JobLogHandler", "init_job_process", "job_pool"]


class JobLogHandler(logging.Handler):
    """Hands a record from a job's process to the logger of its name in this process.

    Records reach whatever handlers the caller installed on the ``deltaft`` logger (the command
    line's), so jobs' warnings look like this process's; the application installs none.
    """

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(record.name).handle(record)


def _die_with(parent: int) -> None:
    """End this process when process ``parent`` ends, however it ends (SIGKILL included), so
    that no job goes on training a folder that a rerun of the comparison trains again.

    On Linux the kernel sends SIGKILL at the parent's death (``PR_SET_PDEATHSIG``); everywhere
    a daemon thread checks every half second that the parent is still this process's parent.
    """
    import ctypes
    import signal
    import sys
    import threading
    import time

    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1  # from <linux/prctl.h>
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)  # the parent is gone: nobody collects this job's result

    if os.getppid() != parent:  # died before the prctl call
        os._exit(1)
    threading.Thread(target=watch, name="deltaft-parent-watch", daemon=True).start()


def init_job_process(threads: int, level: int, queue: Any, parent: int | None = None) -> None:
    """A compare job's process: it dies with ``parent`` (default: the process that started
    it), has its torch threads, sends its log records to the parent through ``queue``, and
    leaves Ctrl-C to the parent."""
    import signal

    import torch

    _die_with(os.getppid() if parent is None else parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    package = logging.getLogger("deltaft")
    package.handlers[:] = [logging.handlers.QueueHandler(queue)]
    package.propagate = False
    package.setLevel(max(level, logging.WARNING))


@contextlib.contextmanager
def job_pool(processes: int, threads: int, interrupted: str) -> Iterator[Any]:
    """A ``spawn`` pool of ``processes`` job processes (:func:`init_job_process`, ``threads``
    torch threads each, logging at this process's level).

    When the block ends the pool is closed and joined (the workers exit on their own; terminate
    would kill them mid-cleanup); on an error it is terminated at once, and Ctrl-C becomes
    ``KeyboardInterrupt(interrupted)``. The log listener stops after the jobs, so every record
    they sent is handled.
    """
    import multiprocessing

    level = logging.getLogger("deltaft").getEffectiveLevel()
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    listener = logging.handlers.QueueListener(queue, JobLogHandler())
    listener.start()
    pool = context.Pool(
        processes, initializer=init_job_process, initargs=(threads, level, queue, os.getpid())
    )
    try:
        yield pool
        pool.close()
        pool.join()
    except KeyboardInterrupt:
        raise KeyboardInterrupt(interrupted) from None
    finally:
        pool.terminate()  # at once on an error or Ctrl-C; a finished pool has nothing left
        pool.join()
        listener.stop()
        queue.close()
