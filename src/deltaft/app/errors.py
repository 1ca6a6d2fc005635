"""Errors of the application: a bad setting names the setting, never a command-line flag.

The application is called from Python as well as from the command line, so its messages name
settings by their parameter name (``lr``); :mod:`deltaft.cli` renders the same message with flags
(``--lr``), in one place. Other bad input is a plain ``ValueError``, a missing user-given file a
``FileNotFoundError`` raised with a message only (no ``errno``), which the command line tells
from a system error by that.
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = ["SettingError", "literal"]

# "{{" and "}}" are literal braces; "{name}" is a setting.
_NAME = re.compile(r"\{\{|\}\}|\{([a-z][a-z0-9_]*)\}")


class SettingError(ValueError):
    """A setting has a value that cannot work; the message says which, and how to fix it.

    The message is a template in which each ``{name}`` is a setting (``{{`` and ``}}`` are
    literal braces): ``str(error)`` writes the parameter name, :meth:`render` whatever the caller
    wants (the command line: ``--name``).

    Example:
        >>> error = SettingError("{lr} must be > 0, got -1.")
        >>> str(error), error.render(lambda key: "--" + key.replace("_", "-"))
        ('lr must be > 0, got -1.', '--lr must be > 0, got -1.')
        >>> error.settings
        ('lr',)
        >>> str(SettingError("{layers} must be names, got {{'a': 1}}."))
        "layers must be names, got {'a': 1}."
    """

    def __init__(self, template: str) -> None:
        self.template = template
        names = (match.group(1) for match in _NAME.finditer(template))
        self.settings = tuple(dict.fromkeys(name for name in names if name))
        super().__init__(self.render(lambda key: key))

    def render(self, name: Callable[[str], str]) -> str:
        """The message with every ``{setting}`` written as ``name(setting)``."""

        def replace(match: re.Match[str]) -> str:
            key = match.group(1)
            return match.group(0)[0] if key is None else name(key)

        return _NAME.sub(replace, self.template)


def literal(text: object) -> str:
    """``str(text)`` escaped for a :class:`SettingError` template: its braces stay braces.

    Example:
        >>> str(SettingError(f"{{out}} {literal('runs/{a}')} exists."))
        'out runs/{a} exists.'
    """
    return str(text).replace("{", "{{").replace("}", "}}")
