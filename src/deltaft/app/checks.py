"""The bounds checks that settings share: each raises a :class:`SettingError` naming the setting.

``name`` is the setting's parameter name (``lr``); the command line renders it as a flag (``--lr``).
Every check also rejects NaN, which compares false with any bound.

Example:
    >>> in_range("hflip", 0.5, 0.0, 1.0)
    >>> try:
    ...     in_range("val_split", 1.0, 0.0, 1.0, right_open=True)
    ... except SettingError as error:
    ...     print(error)
    val_split must be in [0, 1), got 1.0.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from deltaft.app.errors import SettingError, literal
from deltaft.layouts import LAYOUTS

__all__ = [
    "above",
    "at_least",
    "exclusive",
    "in_range",
    "integer",
    "layout_setting",
    "outside_data",
]


def at_least(name: str, value: float, low: float) -> None:
    """``value >= low``, else "``{name} must be >= low, got value.``"."""
    if not value >= low:  # also rejects NaN
        raise SettingError(f"{{{name}}} must be >= {low:g}, got {value}.")


def above(name: str, value: float, low: float) -> None:
    """``value > low``, else "``{name} must be > low, got value.``"."""
    if not value > low:
        raise SettingError(f"{{{name}}} must be > {low:g}, got {value}.")


def in_range(
    name: str,
    value: float,
    low: float,
    high: float,
    *,
    left_open: bool = False,
    right_open: bool = False,
) -> None:
    """``value`` in ``[low, high]`` (``(`` / ``)`` where open), else "``{name} must be in
    [low, high], got value.``"."""
    ok_low = value > low if left_open else value >= low
    ok_high = value < high if right_open else value <= high
    if not (ok_low and ok_high) or math.isnan(value):
        interval = f"{'(' if left_open else '['}{low:g}, {high:g}{')' if right_open else ']'}"
        raise SettingError(f"{{{name}}} must be in {interval}, got {value}.")


def integer(name: str, value: object) -> None:
    """``value`` is an ``int`` (``bool`` is not), else "``{name} must be an integer, got
    value.``" (the message of a value that cannot be read as an integer)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingError(f"{{{name}}} must be an integer, got {literal(repr(value))}.")


def exclusive(one: str, one_value: object, other: str, other_value: object) -> None:
    """At most one of two settings is given (not ``None``)."""
    if one_value is not None and other_value is not None:
        raise SettingError(
            f"Give either {{{one}}} or {{{other}}}, not both (got {one}={literal(one_value)}, "
            f"{other}={literal(other_value)})."
        )


def outside_data(out: str | os.PathLike[str], data: str, *, name: str = "out") -> None:
    """The output folder ``out`` is not ``data`` (an image folder) nor inside it, symbolic links
    resolved; else a :class:`SettingError` naming ``{name}`` and ``{data}``: the run's files
    (PNG figures) would become images of the next run's training split. ``tv:NAME`` data is not
    a folder and passes."""
    if data.startswith("tv:"):
        return
    resolved_out = Path(out).expanduser().resolve()
    resolved_data = Path(data).expanduser().resolve()
    if resolved_out.is_relative_to(resolved_data):
        raise SettingError(
            f"{{{name}}} {literal(out)} is inside {{data}} {literal(data)}: the run's files "
            f"would be read as training images; choose an {{{name}}} outside {{data}}."
        )


def layout_setting(text: str) -> str | dict[str, str] | None:
    """The ``layout`` setting read: ``None`` for ``auto``, one layout for every regularized layer
    (``BNC``), or layouts by layer (``blocks.3=BNC,stem=BCHW``; the layers left out are detected).

    Raises:
        SettingError: anything else; the message shows the accepted forms.
    """
    text = text.strip()
    if text == "auto" or text in LAYOUTS:
        return None if text == "auto" else text
    declared: dict[str, str] = {}
    for part in text.split(","):
        name, sep, layout = (piece.strip() for piece in part.partition("="))
        if not (name and sep and layout in LAYOUTS) or name in declared:
            raise SettingError(
                f"{{layout}} must be auto, one of {', '.join(LAYOUTS)} for every regularized "
                "layer, or distinct LAYER=LAYOUT pairs such as blocks.3=BNC,stem=BCHW (the layers "
                f"left out are detected); got {literal(repr(text))}."
            )
        declared[name] = layout
    return declared
