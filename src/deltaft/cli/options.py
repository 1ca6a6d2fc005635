"""Command-line options: generated from :class:`~deltaft.app.config.TrainConfig`, errors as flags.

A setting is declared once, as a ``TrainConfig`` field: its type gives the option's ``type`` (a
``Literal`` its ``choices``, a ``bool`` a ``--x/--no-x`` pair), its ``metadata`` the help text and
metavar, its default the ``(default: X)`` of the help. Defaults are not set on the parser
(``SUPPRESS``): an option left out is absent from the parsed namespace, so that a ``--config``
file can set it and :func:`config_from_args` can tell it from a default.

Messages of the application name settings (``{lr}`` in a
:class:`~deltaft.app.errors.SettingError`); :func:`flag_name` is the one place that turns them
into flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from deltaft.app.compare import parse_seeds
from deltaft.app.config import EXCLUSIVE, TrainConfig, load_config
from deltaft.app.config_io import settings_from_run
from deltaft.app.errors import SettingError
from deltaft.app.tracking import RunDir

__all__ = [
    "PER_RUN",
    "PROG",
    "Parser",
    "UsageError",
    "add_common",
    "add_log_every_argument",
    "add_seeds_and_jobs_arguments",
    "add_settings",
    "add_train_arguments",
    "argparse_type",
    "config_from_args",
    "flag_name",
    "message",
    "setting_help",
]

PROG = "deltaft"
PER_RUN = ("method", "seed", "resume")  # set per run by `compare`
_SETTING = re.compile(r"\{([a-z][a-z0-9_]*)\}")


def flag_name(key: str) -> str:
    """The command-line flag of a setting: ``batch_size`` -> ``--batch-size``."""
    return "--" + key.replace("_", "-")


def message(error: BaseException) -> str:
    """An error's message as the command line shows it: settings written as flags."""
    return error.render(flag_name) if isinstance(error, SettingError) else str(error)


class UsageError(Exception):
    """An argparse error, reported on one line."""


class Parser(argparse.ArgumentParser):
    """Errors on one line; no abbreviated options (``--val`` is not ``--val-split``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> Any:  # argparse would print the usage and exit
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Turn a parser's ``ValueError`` into argparse's error (one line, exit status 2)."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(message(error)) from None

    convert.__name__ = parse.__name__
    return convert


# ------------------------------------------------------------------------------------------------
# Settings of TrainConfig
# ------------------------------------------------------------------------------------------------
def _shown_default(value: Any) -> str | None:
    """How the help shows a default; ``None``: not at all (required, ``None`` and bools)."""
    if value is None or value is dataclasses.MISSING or isinstance(value, bool):
        return None
    return f"{value:g}" if isinstance(value, float) else str(value)


def setting_help(field: dataclasses.Field[Any], text: str | None = None) -> str:
    """The help of a setting: ``text`` (default: the field's ``help``) with its default.

    ``{default}`` in the text is the field's default, ``{name}`` another setting's flag; a text
    without ``(default`` gets `` (default: X)`` appended when the default is shown.
    """
    text = field.metadata["help"] if text is None else text
    default = _shown_default(field.default)
    if default is not None:
        if "{default}" in text:
            text = text.replace("{default}", default)
        elif "(default" not in text:
            text = f"{text} (default: {default})"
    return _SETTING.sub(lambda match: flag_name(match.group(1)), text)


def _argument(field: dataclasses.Field[Any], hint: Any) -> dict[str, Any]:
    """``add_argument`` keywords of a field: type or choices or action, metavar, help."""
    options: dict[str, Any] = {"help": setting_help(field)}
    if field.metadata.get("metavar"):
        options["metavar"] = field.metadata["metavar"]
    if get_origin(hint) in (Union, types.UnionType):
        hint = next(arg for arg in get_args(hint) if arg is not type(None))
    if get_origin(hint) is Literal:
        options["choices"] = get_args(hint)
    elif hint is bool:
        options["action"] = argparse.BooleanOptionalAction
    elif hint in (int, float):
        options["type"] = hint
    return options  # str and list[str]: the string as given (the config splits "a,b")


def add_settings(
    parser: argparse.ArgumentParser,
    keys: Sequence[str],
    changes: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Add ``--key`` for each of ``keys``, generated from its ``TrainConfig`` field.

    ``changes`` replaces some keywords of some options (``help`` is a template as in the field's
    metadata). The pairs of :data:`~deltaft.app.config.EXCLUSIVE` that are both in ``keys`` form
    mutually exclusive groups.
    """
    fields = {field.name: field for field in dataclasses.fields(TrainConfig)}
    hints = get_type_hints(TrainConfig)
    groups: dict[str, Any] = {}
    for pair in EXCLUSIVE:
        if all(key in keys for key in pair):
            group = parser.add_mutually_exclusive_group()
            groups.update(dict.fromkeys(pair, group))
    for key in keys:
        options = _argument(fields[key], hints[key])
        for name, value in (changes or {}).get(key, {}).items():
            options[name] = setting_help(fields[key], value) if name == "help" else value
        target = groups.get(key, parser)
        target.add_argument(flag_name(key), dest=key, default=argparse.SUPPRESS, **options)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options shared by ``deltaft train`` and ``deltaft compare`` to ``parser``.

    That is ``--config`` and every :class:`~deltaft.app.config.TrainConfig` setting except
    those of :data:`PER_RUN` (``compare`` sets them per run), plus ``--log-every``.
    """
    parser.add_argument("--config", metavar="FILE.yaml", help="settings file; flags override it")
    add_settings(parser, [key for key in TrainConfig.keys() if key not in PER_RUN])  # noqa: SIM118
    add_log_every_argument(parser)


def add_log_every_argument(parser: argparse.ArgumentParser) -> None:
    """``--log-every N``: progress lines every N steps when stderr is not a terminal."""
    parser.add_argument(
        "--log-every",
        type=int,
        default=20,
        metavar="N",
        help="when stderr is not a terminal, print progress every N steps (default: %(default)s)",
    )


def add_seeds_and_jobs_arguments(
    parser: argparse.ArgumentParser, *, jobs: int, jobs_note: str
) -> None:
    """``--seeds`` and ``--jobs``, as ``compare`` and ``demo`` both take them."""
    parser.add_argument(
        "--seeds",
        type=argparse_type(parse_seeds),
        default=[0, 1, 2],
        help="a count N (seeds 0..N-1) or a comma-separated list of seeds (default: 3)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=jobs,
        metavar="N",
        help=(
            "runs trained at once, each in its own process with threads/N torch threads "
            f"(default: {jobs}, {jobs_note})"
        ),
    )


def add_common(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    """-v/-q/--debug/--threads, on the top-level parser and on each subcommand."""
    default: Any = None if top else argparse.SUPPRESS
    flag_default: Any = False if top else argparse.SUPPRESS
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=flag_default, help="debug logging"
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", default=flag_default,
        help="warnings and errors only",
    )  # fmt: skip
    parser.add_argument(
        "--debug", action="store_true", default=flag_default,
        help="show tracebacks instead of one-line errors",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=default, metavar="N", help="torch CPU threads"
    )


def config_from_args(args: argparse.Namespace, **overrides: Any) -> TrainConfig:
    """The :class:`~deltaft.app.config.TrainConfig` of parsed arguments.

    Sources, lowest precedence first: with ``--resume``, the run's own ``config.yaml``; the
    ``--config`` file; the flags given; ``overrides``.

    Raises:
        ValueError: a bad file, key or value (:class:`~deltaft.app.errors.SettingError` for a
            setting).
    """
    keys = set(TrainConfig.keys())
    given = {key: value for key, value in vars(args).items() if key in keys}
    sources: list[dict[str, Any]] = []
    if given.get("resume") and given.get("out"):
        stored = RunDir(given["out"]).config_path
        if stored.is_file():
            sources.append(settings_from_run(load_config(stored), given, str(stored)))
    if getattr(args, "config", None):
        sources.append(load_config(args.config))
    return TrainConfig.from_sources(*sources, given, overrides, origin="the command line")
