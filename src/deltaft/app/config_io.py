"""Settings in: YAML files read into mappings, keys normalised, values coerced to field types.

The pieces of :mod:`deltaft.app.config` that know nothing of its fields: YAML 1.1 reads ``1e-4``
(no dot) as a string and ``a,b`` is a list to a command line, so a value is coerced to the type
of its field before the field's bounds are checked.

Example:
    >>> coerce("lr", "1e-4", float), coerce("layers", "a, b", list[str])
    (0.0001, ['a', 'b'])
    >>> normalise_keys({"batch-size": 8}, ["batch_size", "lr"], "flags")
    {'batch_size': 8}
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from deltaft.app.errors import SettingError, literal

__all__ = ["coerce", "normalise_keys", "read_settings_file", "shorten"]

# User text in an error message is cut to this many characters: a message stays one short line.
_SHOWN_CHARS = 80


def shorten(value: object, limit: int = _SHOWN_CHARS) -> str:
    """``str(value)`` cut to ``limit`` characters (``...`` marks the cut), on one line.

    Example:
        >>> shorten("x" * 100, 10)
        'xxxxxxx...'
    """
    text = " ".join(str(value).splitlines())
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


def read_settings_file(path: str | Path) -> dict[str, Any]:
    """The mapping in the YAML file ``path`` (``yaml.safe_load``); an empty file is ``{}``.

    Keys are returned as written (:func:`normalise_keys` checks them).

    Raises:
        SettingError: the file does not exist (names the ``config`` setting).
        ValueError: the file is unreadable, is not YAML or is not a mapping.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SettingError(
            f"Config file {literal(path)} does not exist; check the {{config}} path."
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"Config file {path} cannot be read: {error}.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise ValueError(f"Config file {path} is not valid YAML{at}: {problem}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(
            f"Config file {path} must be a mapping of settings (key: value), got "
            f"{type(data).__name__}."
        )
    return data


def normalise_keys(
    values: Mapping[str, Any], valid: Sequence[str], origin: str, *, strict: bool = True
) -> dict[str, Any]:
    """``values`` with ``-`` in keys turned into ``_``; keys not in ``valid`` raise (or, with
    ``strict=False``, are dropped).

    Raises:
        ValueError: an unknown key, with the closest valid one and the list of valid keys;
            ``origin`` says where the keys came from (``config file c.yaml``).
    """
    out: dict[str, Any] = {}
    unknown = []
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in valid:
            out[name] = value
        else:
            unknown.append(str(key))
    if unknown and strict:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key.replace("-", "_"), valid, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(
            f"Unknown setting(s) {', '.join(hints)} in {origin}; valid settings: "
            f"{', '.join(sorted(valid))}."
        )
    return out


def coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` converted to the field type ``hint``, or a :class:`SettingError`."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return coerce(name, value, options[0])
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise SettingError(
                f"{{{name}}} must be one of {', '.join(map(str, choices))}; "
                f"got {literal(repr(value))}."
            )
        return value
    if origin is list:
        return _coerce_list(name, value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise SettingError(f"{{{name}}} must be true or false, got {literal(repr(value))}.")
    if hint is int:
        return _coerce_int(name, value)
    if hint is float:
        return _coerce_float(name, value)
    if hint is str:
        if isinstance(value, (str, Path)) and not isinstance(value, bool):
            return str(value)
        raise SettingError(f"{{{name}}} must be a string, got {literal(repr(value))}.")
    raise TypeError(f"Unsupported field type {hint!r} for {name}.")  # a bug, not user input


def _coerce_int(name: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise SettingError(f"{{{name}}} must be an integer, got {literal(repr(value))}.")


def _coerce_float(name: str, value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise SettingError(f"{{{name}}} must be a number, got {literal(repr(value))}.")


def _coerce_list(name: str, value: Any) -> list[str]:
    items: list[Any]
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = [part.strip() if isinstance(part, str) else part for part in value]
    else:
        raise SettingError(
            f"{{{name}}} must be a list of names or 'a,b,c', got {literal(repr(value))}."
        )
    if not all(isinstance(part, str) and part for part in items):
        raise SettingError(f"{{{name}}} must be non-empty names, got {literal(repr(value))}.")
    return items
