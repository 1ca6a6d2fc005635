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
import reprlib
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from deltaft.app.errors import SettingError, literal

__all__ = [
    "MAX_YAML_NODES",
    "coerce",
    "normalise_keys",
    "read_settings_file",
    "runs_code",
    "settings_from_run",
    "short_repr",
    "shorten",
]

# User text in an error message is cut to this many characters: a message stays one short line.
_SHOWN_CHARS = 80
# A settings file may expand (aliases counted each time they are used) to at most this many YAML
# nodes: a real one has a few hundred; nine aliases of nine aliases... would have billions.
MAX_YAML_NODES = 10_000
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 2, 4, 4, 4
_REPR.maxstring = _REPR.maxother = _SHOWN_CHARS


def shorten(value: object, limit: int = _SHOWN_CHARS) -> str:
    """``str(value)`` cut to ``limit`` characters (``...`` marks the cut), on one line.

    Example:
        >>> shorten("x" * 100, 10)
        'xxxxxxx...'
    """
    text = " ".join(str(value).splitlines())
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


class _SettingsLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys and documents that expand too far.

    Aliases are shared, not copied, by PyYAML, so a 300-byte file of nested aliases loads
    quickly, but whatever walks the result (a check, an error message, a ``repr``) meets
    billions of items: the expanded size is bounded before anything is constructed.
    """

    def compose_document(self) -> yaml.Node | None:
        node: yaml.Node | None = super().compose_document()
        if node is not None:
            _expanded_size(node, {}, set())
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *base" keys may be overridden, as YAML's merge key says
            key = self.construct_object(key_node, deep=True)
            try:
                line = first.get(key)
            except TypeError:
                continue  # an unhashable key: the base class reports it
            if line is not None:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {short_repr(key)} (first on line {line + 1}); keep one of them",
                    key_node.start_mark,
                )
            first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """Nodes in ``node`` with every alias expanded; raises past :data:`MAX_YAML_NODES`."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    if id(node) in open_:
        raise yaml.composer.ComposerError(
            None, None, "an alias refers to its own anchor (a recursive structure)", node.start_mark
        )
    open_.add(id(node))
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, sizes, open_) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            size += _expanded_size(key, sizes, open_) + _expanded_size(value, sizes, open_)
    open_.discard(id(node))
    if size > MAX_YAML_NODES:
        raise yaml.composer.ComposerError(
            None,
            None,
            f"its aliases expand to more than {MAX_YAML_NODES} values; a settings file needs "
            "no more: write the values out",
            node.start_mark,
        )
    sizes[id(node)] = size
    return size


def short_repr(value: object) -> str:
    """``repr(value)`` for an error message: bounded work and at most 80 characters.

    A nested list is shown a few items and levels deep (``reprlib``), so that a value of a
    billion items costs no more than a short one.

    Example:
        >>> short_repr("abc"), short_repr(list(range(100)))
        ("'abc'", '[0, 1, 2, 3, ...]')
    """
    return shorten(_REPR.repr(value))


def runs_code(name: str) -> bool:
    """Whether building the model ``name`` imports and calls user code (``pkg.module:factory``).

    torchvision and timm names (``timm:NAME``) only build a library's network.

    Example:
        >>> runs_code("tests.toy_models:tiny_cnn"), runs_code("timm:resnet18"), runs_code("vgg11")
        (True, False, False)
    """
    return ":" in name and not name.startswith("timm:")


def settings_from_run(
    stored: Mapping[str, Any], given: Mapping[str, Any], origin: str
) -> dict[str, Any]:
    """Settings read back from a run folder (``--resume``), made inert: a file never decides
    that a command runs code or downloads; only the command line does.

    ``download`` is dropped; a ``pkg.module:factory`` model is kept only when ``given`` (the
    command line) names a model too, which then takes precedence anyway.

    Raises:
        SettingError: ``stored`` names a model factory and ``given`` names no model.
    """
    settings = {key: value for key, value in stored.items() if key != "download"}
    model = settings.get("model")
    if isinstance(model, str) and runs_code(model) and given.get("model") is None:
        raise SettingError(
            f"{literal(origin)} names the model factory {literal(shorten(model))}, which would "
            "be imported and called; a run folder never runs code by itself: pass "
            f"{{model}} {literal(shorten(model))} if you trust that code."
        )
    return settings


def read_settings_file(path: str | Path) -> dict[str, Any]:
    """The mapping in the YAML file ``path`` (safe YAML); an empty file is ``{}``.

    Keys are returned as written (:func:`normalise_keys` checks them). Only plain YAML is read
    (``yaml.SafeLoader``: no Python objects), a key may appear once per mapping, and aliases may
    expand the document to at most :data:`MAX_YAML_NODES` values, so that a small file cannot
    cost gigabytes of memory or minutes of time.

    Raises:
        SettingError: the file does not exist (names the ``config`` setting).
        ValueError: the file is unreadable, is not YAML or is not a mapping; a duplicate key;
            aliases that expand too far or refer to themselves; nesting too deep.
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
        data = yaml.load(text, Loader=_SettingsLoader)  # a SafeLoader: no Python objects
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise ValueError(
            f"Config file {path} is not valid YAML{at}: {shorten(problem, 2 * _SHOWN_CHARS)}."
        ) from None
    except RecursionError:
        raise ValueError(
            f"Config file {path} is nested too deeply; a settings file is a flat mapping."
        ) from None
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
        for key in unknown[:5]:
            close = difflib.get_close_matches(key.replace("-", "_"), valid, n=1)
            hints.append(short_repr(key) + (f" (did you mean {close[0]!r}?)" if close else ""))
        if len(unknown) > 5:
            hints.append(f"and {len(unknown) - 5} more")
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
                f"got {literal(short_repr(value))}."
            )
        return value
    if origin is list:
        if get_args(hint) == (float,):
            return _coerce_floats(name, value)
        return _coerce_list(name, value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise SettingError(f"{{{name}}} must be true or false, got {literal(short_repr(value))}.")
    if hint is int:
        return _coerce_int(name, value)
    if hint is float:
        return _coerce_float(name, value)
    if hint is str:
        if isinstance(value, (str, Path)) and not isinstance(value, bool):
            return str(value)
        raise SettingError(f"{{{name}}} must be a string, got {literal(short_repr(value))}.")
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
    raise SettingError(f"{{{name}}} must be an integer, got {literal(short_repr(value))}.")


def _coerce_float(name: str, value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise SettingError(f"{{{name}}} must be a number, got {literal(short_repr(value))}.")


def _coerce_floats(name: str, value: Any) -> list[float]:
    """A list of numbers from ``"0,0.5,1"`` (a flag), a YAML list or a single number."""
    items: list[Any]
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        items = [value]
    else:
        raise SettingError(
            f"{{{name}}} must be a list of numbers or 'a,b,c', got {literal(short_repr(value))}."
        )
    try:
        return [_coerce_float(name, item) for item in items]
    except SettingError:
        raise SettingError(
            f"{{{name}}} must be numbers like 0,0.5,1, got {literal(short_repr(value))}."
        ) from None


def _coerce_list(name: str, value: Any) -> list[str]:
    items: list[Any]
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = [part.strip() if isinstance(part, str) else part for part in value]
    else:
        raise SettingError(
            f"{{{name}}} must be a list of names or 'a,b,c', got {literal(short_repr(value))}."
        )
    if not all(isinstance(part, str) and part for part in items):
        raise SettingError(f"{{{name}}} must be non-empty names, got {literal(short_repr(value))}.")
    return items
