"""``deltaft tune``: each method's settings chosen on validation (Optuna); the best as configs."""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from deltaft.app.compare import parse_methods
from deltaft.app.config import TrainConfig
from deltaft.app.config_io import read_settings_file
from deltaft.app.errors import SettingError
from deltaft.app.methods import spec_help
from deltaft.cli.compare import RefuseFlag
from deltaft.cli.options import add_settings, add_train_arguments, argparse_type

__all__ = ["SPACE_KEY", "add_parser", "run"]

SPACE_KEY = "search_space"  # the config file's key for the spaces (not a train setting)
_REFUSED = {
    "--method": "use --methods l2,delta (a comma list): each method gets its own study",
    "--resume": "tune always continues the study in --out (or --storage) when run again",
}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``tune`` to ``subparsers`` (``add_subparsers()``'s result)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "tune",
        help="tune each method's settings on validation (Optuna); write the best as configs",
        description=(
            "For each method, an Optuna study over its own settings (lr for all; alpha, beta for "
            "l2sp/fm/delta; weight_decay for l2; change them under 'search_space:' in the "
            "--config file), each trial a training run scored on the validation split (the "
            "test split is never read), poor trials pruned per epoch. Writes OUT/tune.md, "
            "tune.json, best/<method>.yaml (for `deltaft train --config`) and figures; then "
            "`deltaft compare --tuned OUT` scores the best settings on test. Running it again "
            "continues the study; several processes or machines may run it on one --storage."
        ),
    )
    parser.add_argument(
        "--methods",
        type=argparse_type(parse_methods),
        default=["l2", "l2sp", "delta"],
        help=f"comma-separated method specs, each {spec_help()} (default: l2,l2sp,delta)",
    )
    parser.add_argument(
        "--trials", type=int, default=20, metavar="N",
        help="finished (complete or pruned) trials per method, across every process (default: 20)",
    )  # fmt: skip
    parser.add_argument(
        "--storage",
        metavar="URL",
        help=(
            "an Optuna storage URL shared by every process, e.g. postgresql://user@host/db "
            "(default: the journal file OUT/study.log, locked for processes on one machine; "
            "for several machines or an NFS folder use a database URL)"
        ),
    )
    parser.add_argument(
        "--jobs", type=int, default=1, metavar="K",
        help="trials at once, each in its own process with threads/K torch threads (default: 1)",
    )  # fmt: skip
    parser.add_argument(
        "--sampler", choices=("tpe", "grid"), default="tpe",
        help="tpe (seeded from --seed) or grid (small spaces: each range at 3 points or its "
        "'grid' list) (default: tpe)",
    )  # fmt: skip
    parser.add_argument(
        "--pruner", choices=("median", "halving", "none"), default="median",
        help="stop poor trials from their per-epoch validation accuracy (default: median)",
    )  # fmt: skip
    parser.add_argument(
        "--keep-trials", choices=("best", "all", "none"), default="best",
        help="trial run folders kept in OUT/trials: each method's best, all or none "
        "(default: best)",
    )  # fmt: skip
    add_train_arguments(parser)
    for action in parser._actions:  # argparse has no public way to reword an added option
        if action.dest == "out":
            action.metavar = "OUT"
            action.help = "tuning folder: study.log, trials/, best/, tune.*"
    for flag, hint in _REFUSED.items():
        parser.add_argument(
            flag, nargs="?", action=RefuseFlag, help=argparse.SUPPRESS, hint=hint, command="tune"
        )
    add_settings(parser, ["seed"])  # every trial's seed, and the sampler's
    parser.set_defaults(func=run)
    return parser


def _config(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, Any] | None]:
    """The base configuration and the ``search_space`` of the ``--config`` file (if any)."""
    keys = set(TrainConfig.keys())
    given = {k: v for k, v in vars(args).items() if k in keys and v is not None}
    settings: dict[str, Any] = {}
    space = None
    if args.config:
        settings = dict(read_settings_file(args.config))
        spaces = [settings.pop(key) for key in (SPACE_KEY, "search-space") if key in settings]
        if len(spaces) > 1:
            raise SettingError(
                f"{args.config} sets both search_space and search-space; keep one of them."
            )
        space = spaces[0] if spaces else None
    origin = f"config file {args.config}" if args.config else "the command line"
    base = TrainConfig.from_sources(settings, given, origin=origin)
    return base, space


@contextlib.contextmanager
def _quiet_runs(verbose: bool) -> Iterator[None]:
    """Without -v, each trial's own info lines (model built, data, epochs) are left out: the
    trial lines (result, best, ETA) say how the tuning goes."""
    names = ("deltaft.app.loop", "deltaft.app.models", "deltaft.app.data", "deltaft.app.attention")
    loggers = [logging.getLogger(name) for name in names]
    levels = [log.level for log in loggers]
    if not verbose:
        for log in loggers:
            log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


def run(args: argparse.Namespace) -> int:
    """Tune, print the table and where the files are."""
    from deltaft.app.tune import TuneOptions, run_tune
    from deltaft.app.tune_space import parse_search_space

    base, space = _config(args)
    origin = f"{args.config}: {SPACE_KEY}" if args.config else SPACE_KEY
    options = TuneOptions(
        trials=args.trials,
        sampler=args.sampler,
        pruner=args.pruner,
        storage=args.storage,
        jobs=args.jobs,
        keep_trials=args.keep_trials,
        space=parse_search_space(space, origin),
    )
    with _quiet_runs(getattr(args, "verbose", False)):
        result = run_tune(
            base, args.methods, base.out, options, progress=getattr(args, "progress", None)
        )
    print(result.table_markdown())
    for path in result.files.values():
        print(f"wrote {path}")
    print(f"next: deltaft compare --tuned {result.out} --seeds 3 --out OUT2 (scores on test)")
    return 0
