"""``deltaft compare``: train several methods on the same data and seeds; print a table."""

from __future__ import annotations

import argparse
from typing import Any

from deltaft.app.compare import parse_methods, run_compare
from deltaft.app.config import TrainConfig
from deltaft.app.config_io import normalise_keys, read_settings_file
from deltaft.app.methods import spec_help
from deltaft.cli.options import (
    add_seeds_and_jobs_arguments,
    add_train_arguments,
    argparse_type,
    config_from_args,
)

__all__ = ["RefuseFlag", "add_parser", "run"]

_PER_RUN_FLAGS = {
    "--method": "compare sets the method of each run: use --methods l2,delta (a comma list)",
    "--seed": "compare sets the seed of each run: use --seeds 3 (seeds 0..2) or --seeds 0,7,42",
    "--resume": "compare always continues: finished runs are reused, interrupted ones resumed",
}


class RefuseFlag(argparse.Action):
    """A flag of ``deltaft train`` that ``compare`` sets per run: an error that says what to use."""

    def __init__(self, *args: Any, hint: str, command: str = "compare", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hint, self.command = hint, command

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        raise argparse.ArgumentError(self, f"not an option of {self.command}; {self.hint}.")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``compare`` to ``subparsers`` (``add_subparsers()``'s result).

    Its options are ``--methods``, ``--seeds``, ``--jobs`` and every option of ``deltaft train``
    but ``--method``, ``--seed`` and ``--resume``, with ``--out`` naming the comparison folder.
    The comparison sets those three per run: given, they are errors that say what to use instead.
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "compare",
        help="train several methods on the same data and seeds; print a table, write a plot",
        description=(
            "Train every method with every seed on the same data (runs in OUT/<method>-seed<seed>, "
            "reused when finished, so an interrupted comparison continues), then print a markdown "
            "table of accuracy (mean ± std over seeds) and write OUT/compare.md, compare.json and "
            "compare.png."
        ),
    )
    parser.add_argument(
        "--methods",
        type=argparse_type(parse_methods),
        default=None,
        help=(
            f"comma-separated method specs, each {spec_help()}, or 'scratch' (l2 from random "
            "weights) (default: l2,l2sp,delta)"
        ),
    )
    parser.add_argument(
        "--tuned",
        metavar="DIR",
        help=(
            "a `deltaft tune` folder: each method runs with its best settings on validation "
            "(the tuned methods unless --methods is given; the tune's settings unless a flag "
            "or --config changes them), scored on test once"
        ),
    )
    add_seeds_and_jobs_arguments(parser, jobs=1, jobs_note="in this process")
    add_train_arguments(parser)
    for action in parser._actions:  # argparse has no public way to reword an added option
        if action.dest == "out":
            action.metavar = "OUT"
            action.help = "comparison folder: one run folder per method and seed, compare.*"
    # Without these, argparse would read --method / --seed as abbreviations of --methods / --seeds.
    for flag, hint in _PER_RUN_FLAGS.items():
        parser.add_argument(flag, nargs="?", action=RefuseFlag, help=argparse.SUPPRESS, hint=hint)
    parser.set_defaults(func=run)
    return parser


def _tuned_config(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, dict[str, Any]]]:
    """``--tuned DIR``: the tune's base settings (lowest), ``--config``, then the flags given;
    and each method's best settings."""
    from deltaft.app.tune_report import load_tuned, tuned_base

    tuned = load_tuned(args.tuned)
    keys = set(TrainConfig.keys())
    given = {key: value for key, value in vars(args).items() if key in keys}
    file = None
    if args.config:  # the tune's own file may hold its search space: it served the tune
        settings = read_settings_file(args.config)
        for key in ("search_space", "search-space"):
            settings.pop(key, None)
        file = normalise_keys(settings, TrainConfig.keys(), f"config file {args.config}")
    return TrainConfig.from_sources(tuned_base(args.tuned), file, given), tuned


def run(args: argparse.Namespace) -> int:
    """Run the comparison, print the table and where the files are."""
    tuned = None
    if getattr(args, "tuned", None):
        base, tuned = _tuned_config(args)
        methods = args.methods or list(tuned)
    else:
        base = config_from_args(args)  # --out may come from a --config file
        methods = args.methods or ["l2", "l2sp", "delta"]
    result = run_compare(
        base,
        methods,
        args.seeds,
        base.out,
        progress=getattr(args, "progress", None),
        jobs=args.jobs,
        tuned=tuned,
        tuned_from=getattr(args, "tuned", None),
    )
    print(result.table_markdown())
    for path in result.files.values():
        print(f"wrote {path}")
    return 0
