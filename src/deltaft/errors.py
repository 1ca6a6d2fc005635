"""The one exception type for mistakes in the user's input."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """A problem with the user's input (paths, names, options).

    The CLI prints it on one line and exits with status 2. The message says what was wrong and how
    to fix it.
    """
