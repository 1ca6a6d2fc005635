"""``deltaft attention``: estimate DELTA's channel attention and save it."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from deltaft.cli.options import add_settings, config_from_args

__all__ = ["KEYS", "add_parser", "run"]

# The settings the attention estimate uses (an explicit subset of TrainConfig's).
KEYS = (
    "data", "model", "weights", "out", "layers", "batch_size", "image_size", "preset", "hflip",
    "crop_scale", "per_class", "fraction", "val_split", "attention_epochs", "attention_batches",
    "attention_method", "temperature", "bn", "head", "seed", "device", "workers", "download",
    "data_root", "layout", "exclude_prefix_tokens",
)  # fmt: skip


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``attention`` to ``subparsers`` (``add_subparsers()``'s result)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "attention",
        help="estimate DELTA's channel attention and save it",
        description="Train a new head on the frozen source, score every channel of the layers "
        "and save the attention (reuse it with `deltaft train --attention FILE`).",
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="settings file")
    add_settings(
        parser,
        KEYS,
        {
            "out": {"metavar": "FILE", "help": "the attention file to write (must not exist)"},
            "batch_size": {"help": "images per batch (default: {default}, as the reference)"},
        },
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Estimate, save, and print each layer's range of ``C * w`` (1 = uniform)."""
    from deltaft.app.attention import run_attention

    cfg = config_from_args(args, method="delta")
    bar = not args.quiet and sys.stderr.isatty()  # a bar while the channels are scored
    attention = run_attention(cfg, cfg.out, progress=bar)
    print(f"wrote {cfg.out}")
    for name, weights in attention.weights.items():
        scaled = weights.double() * weights.numel()  # 1 = uniform
        low, high = float(scaled.min()), float(scaled.max())
        print(f"  {name}: {weights.numel()} channels, C*w in [{low:.3f}, {high:.3f}]")
    return 0
