"""The ``deltaft`` command: ``train``, ``attention``, ``eval``, ``layers``, ``compare``, ``demo``,
``split``, ``tune``.

This package is the only place that parses arguments, configures logging, threads, devices and
the process group, and prints to stdout; each subcommand is a module with ``add_parser`` and
``run``, calling an operation of :mod:`deltaft.app`. Options are generated from the
:class:`~deltaft.app.config.TrainConfig` fields (:mod:`deltaft.cli.options`).

Errors end with one line on stderr, ``deltaft: error: ...``, and an exit status: 2 for bad input
(a ``ValueError``, settings shown as flags, or a ``FileNotFoundError`` raised with a message
about a path the user gave), 1 for a diverged training or a system error (another ``OSError``),
130 when interrupted (Ctrl-C, SIGTERM or SIGHUP). ``--debug`` shows the traceback instead.

Examples::

    deltaft layers --model resnet50
    deltaft train --data birds/ --model resnet50 --method delta --out runs/birds-delta
    deltaft train --out runs/birds-delta --resume
    deltaft eval --run runs/birds-delta --split test
    deltaft split 256_ObjectCategories data/caltech256-30 --train-per-class 30 \\
        --test-per-class 20 --exclude 257.clutter
    torchrun --nproc_per_node 4 -m deltaft train --config configs/paper.yaml --data birds/ ...
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

import torch

from deltaft import __version__
from deltaft.app.signals import terminate_as_interrupt
from deltaft.cli import attention, compare, demo, eval, layers, split, train, tune
from deltaft.cli.console import ProgressPrinter, configure_logging
from deltaft.cli.options import (
    PROG,
    Parser,
    UsageError,
    add_common,
    add_train_arguments,
    config_from_args,
    message,
)
from deltaft.engine import NonFiniteLossError

__all__ = [
    "ProgressPrinter",
    "add_train_arguments",
    "build_parser",
    "config_from_args",
    "exit_status",
    "main",
]

_SUBCOMMANDS = (train, attention, eval, layers, compare, demo, split, tune)


def build_parser() -> argparse.ArgumentParser:
    """The ``deltaft`` argument parser with every subcommand."""
    parser = Parser(
        prog=PROG,
        description="DELTA regularized transfer learning: fine-tune a pretrained CNN on your "
        "images with DELTA or a baseline (l2, l2sp, fm).",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    add_common(parser, top=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in _SUBCOMMANDS:
        add_common(command.add_parser(subparsers))
    return parser


def exit_status(error: BaseException) -> tuple[int, str] | None:
    """The exit status and the one-line message of an error; ``None``: not ours to report.

    ``ValueError``: 2 (bad input). ``FileNotFoundError`` without an ``errno``: 2 (the
    application's "this path you gave does not exist"). ``NonFiniteLossError``: 1. Another
    ``OSError``: 1, the message prefixed with its type.
    """
    if isinstance(error, ValueError):
        return 2, message(error)
    if isinstance(error, FileNotFoundError) and error.errno is None:
        return 2, str(error)
    if isinstance(error, NonFiniteLossError):
        return 1, str(error)
    if isinstance(error, OSError):
        return 1, f"{type(error).__name__}: {error}"
    return None


def _error(text: str) -> None:
    line = " ".join(text.split())
    sys.stderr.write(f"{PROG}: error: {line}\n")
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``deltaft`` command line; returns the exit status.

    0: success; 1: training diverged or a system error; 2: a user error (one line on stderr);
    130: interrupted.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as error:
        _error(str(error))
        return 2
    except SystemExit as exit_:  # --help, --version
        return exit_.code if isinstance(exit_.code, int) else 0
    if args.threads is not None and args.threads < 1:
        _error(f"--threads must be >= 1, got {args.threads}.")
        return 2
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    configure_logging(level)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    quiet_progress = args.quiet or not hasattr(args, "log_every")
    progress = None if quiet_progress else ProgressPrinter(every=args.log_every)
    args.progress = progress
    func: Callable[[argparse.Namespace], int | None] = args.func
    try:
        with terminate_as_interrupt():  # docker, Slurm and systemd stop with SIGTERM
            return int(func(args) or 0)
    except KeyboardInterrupt as error:  # a TrainingInterrupted says what it saved
        if progress is not None:
            progress.close()
        _error(str(error) or "interrupted.")
        return 130
    except Exception as error:
        if progress is not None:
            progress.close()
        status = exit_status(error)
        if status is None or args.debug:
            raise
        _error(status[1])
        return status[0]
