"""``deltaft train``: fine-tune a model on an image folder."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from deltaft.app import distributed
from deltaft.cli.options import PER_RUN, add_settings, add_train_arguments, config_from_args

__all__ = ["add_parser", "percent", "run"]

logger = logging.getLogger("deltaft")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``train`` to ``subparsers`` (``add_subparsers()``'s result)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "train",
        help="fine-tune a model on an image folder",
        description="Fine-tune --model on --data with --method; writes RUN_DIR (config.yaml, "
        "metrics.jsonl, checkpoints/, summary.json, figures).",
    )
    add_train_arguments(parser)
    add_settings(parser, PER_RUN)
    parser.set_defaults(func=run)
    return parser


def percent(value: float | None) -> str:
    """``12.34%``, or ``-`` for ``None``."""
    return "-" if value is None else f"{100 * value:.2f}%"


def run(args: argparse.Namespace) -> int:
    """Train (rank 0 speaks for every process under ``torchrun``) and print the summary."""
    from deltaft.app.train import run_training

    cfg = config_from_args(args)
    info = distributed.init_from_env(cfg.device)
    try:
        if not info.is_main:
            logger.setLevel(logging.ERROR)
        progress = args.progress if info.is_main else None
        bar = progress is not None and progress.tty  # a bar while the attention is scored
        summary = run_training(cfg, progress=progress, dist=info, attention_progress=bar)
    finally:
        distributed.shutdown()
    if info.is_main:
        print(f"run: {summary['out']}")
        print(
            f"method {summary['method']}, seed {summary['seed']}, {summary['epochs']} epochs, "
            f"{summary['seconds']:.1f} s"
        )
        if summary["val_accuracy"] is not None:
            best = f"{percent(summary['best_val_accuracy'])} at epoch {summary['best_epoch']}"
            print(f"val accuracy: {percent(summary['val_accuracy'])} (best {best})")
        if summary["test_accuracy"] is not None:
            print(f"test accuracy: {percent(summary['test_accuracy'])}")
        if "wise" in summary:  # recipe +wise: the lines above are the WiSE-FT model's
            print(
                f"WiSE-FT: a={summary['wise']['alpha']:g} chosen on validation "
                f"(checkpoints/wise.pt); fine-tuned network's test accuracy: "
                f"{percent(summary['finetuned']['test_accuracy'])}"
            )
        if summary["skipped"]["count"]:
            print(f"skipped {summary['skipped']['count']} unreadable image(s)")
    return 0
