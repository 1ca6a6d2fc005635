"""``deltaft split``: a seeded train/test split with N images per class."""

from __future__ import annotations

import argparse
from typing import Any, get_args

from deltaft.app.split import Link, split_per_class

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``split`` to ``subparsers`` (``add_subparsers()``'s result)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "split",
        help="write a seeded train/test split with N images per class (e.g. Caltech-256)",
        description=(
            "Choose TRAIN training and TEST test images of every class of SRC/<class>/ "
            "(seeded; the same seed gives the same split anywhere) and write DST/train/<class>/, "
            "DST/test/<class>/ as links or copies, and DST/split.json listing every file. "
            "Caltech-256 as in the paper: --train-per-class 30 (or 60) --test-per-class 20 "
            "--exclude 257.clutter."
        ),
    )
    parser.add_argument("src", metavar="SRC", help="folder of class folders (only read)")
    parser.add_argument("dst", metavar="DST", help="new (or empty) folder outside SRC")
    parser.add_argument(
        "--train-per-class", type=int, required=True, metavar="TRAIN", help="e.g. 30 or 60"
    )
    parser.add_argument("--test-per-class", type=int, required=True, metavar="TEST", help="e.g. 20")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default: %(default)s)")
    parser.add_argument(
        "--exclude",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME",
        help="class folders to leave out (Caltech-256: 257.clutter)",
    )
    parser.add_argument(
        "--link",
        choices=get_args(Link),
        default="symlink",
        help="symlink (default), hardlink (same file system) or copy",
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Write the split and say what it holds."""
    result = split_per_class(
        args.src,
        args.dst,
        train_per_class=args.train_per_class,
        test_per_class=args.test_per_class,
        seed=args.seed,
        exclude=args.exclude,
        link=args.link,
    )
    print(
        f"{len(result.classes)} classes: {len(result.train)} train + {len(result.test)} test "
        f"images ({args.train_per_class} + {args.test_per_class} per class, seed {args.seed}, "
        f"{args.link}) in {result.dst}; every file is listed in {result.manifest}"
    )
    return 0
