"""The one exception type for mistakes in the user's input."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

__all__ = ["UserError", "argparse_type"]


class UserError(ValueError):
    """A problem with the user's input (paths, names, options).

    The CLI prints it on one line and exits with status 2. The message says what was wrong and how
    to fix it.
    """


def argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Turn a parser's ``UserError`` into argparse's error (usage line, exit status 2)."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except UserError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = parse.__name__
    return convert
