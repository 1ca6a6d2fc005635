"""Errors of the application: a bad setting names the setting, never a command-line flag.

The application is called from Python as well as from the command line, so its messages name
settings by their parameter name (``lr``); :mod:`deltaft.cli` renders the same message with flags
(``--lr``), in one place.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import Any

__all__ = ["SettingError", "UserError", "argparse_type"]

_NAME = re.compile(r"\{([a-z][a-z0-9_]*)\}")


class SettingError(ValueError):
    """A setting has a value that cannot work; the message says which, and how to fix it.

    The message is a template in which each ``{name}`` is a setting: ``str(error)`` writes the
    parameter name, :meth:`render` whatever the caller wants (the command line: ``--name``).

    Example:
        >>> error = SettingError("{lr} must be > 0, got -1.")
        >>> str(error), error.render(lambda key: "--" + key.replace("_", "-"))
        ('lr must be > 0, got -1.', '--lr must be > 0, got -1.')
        >>> error.settings
        ('lr',)
    """

    def __init__(self, template: str) -> None:
        self.template = template
        self.settings = tuple(dict.fromkeys(_NAME.findall(template)))
        super().__init__(self.render(lambda key: key))

    def render(self, name: Callable[[str], str]) -> str:
        """The message with every ``{setting}`` written as ``name(setting)``."""
        return _NAME.sub(lambda match: name(match.group(1)), self.template)


class UserError(ValueError):
    """A problem with the user's input (paths, names, options).

    Being replaced by :class:`SettingError` (a setting) and plain ``ValueError`` (anything
    else); the CLI prints both on one line and exits with status 2.
    """


def argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Turn a parser's ``UserError`` into argparse's error (usage line, exit status 2).

    Command-line plumbing; it moves to :mod:`deltaft.cli` with the subcommands' parsers.
    """

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = parse.__name__
    return convert
