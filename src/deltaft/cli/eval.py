"""``deltaft eval``: evaluate a run's checkpoint."""

from __future__ import annotations

import argparse
from typing import Any

from deltaft.cli.train import percent

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``eval`` to ``subparsers`` (``add_subparsers()``'s result)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "eval",
        help="evaluate a run's checkpoint",
        description="Top-1 accuracy and loss of a run's checkpoint on its test (or val) split, "
        "or on --data with the same classes.",
    )
    parser.add_argument("--run", required=True, metavar="RUN_DIR", help="the run directory")
    parser.add_argument("--data", metavar="DIR", help="other data (default: the run's)")
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument(
        "--checkpoint",
        choices=("best", "last", "wise"),
        default="best",
        help="best (validation), last epoch, or wise: the WiSE-FT weights of a +wise run "
        "(default: best)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, dest="batch_size")
    parser.add_argument("--workers", type=int)
    parser.add_argument(
        "--model",
        metavar="NAME",
        help="the run's model; needed for a pkg.module:factory model, whose code a checkpoint "
        "never imports by itself",
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Evaluate and print one line."""
    from deltaft.app.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.run,
        data=args.data,
        split=args.split,
        checkpoint=args.checkpoint,
        device=args.device,
        batch_size=args.batch_size,
        workers=args.workers,
        model=args.model,
    )
    print(
        f"{result['split']} accuracy {percent(result['accuracy'])}, loss {result['loss']:.4f} "
        f"({result['images']} images; {result['checkpoint']}.pt, epoch {result['epoch']})"
    )
    return 0
