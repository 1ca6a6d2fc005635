"""Search spaces of ``deltaft tune``: which settings each method tunes, over which ranges.

A method's space is the union of the entries of :data:`DEFAULT_SPACES` for ``all``, its base
method and each of its recipes (later entries win), then of the user's ``search_space`` (the
same keys, plus a full spec such as ``delta+lpft``). Every tuned name is a
:class:`~deltaft.app.config.TrainConfig` setting; the other settings come from the base
configuration.

In a configuration file::

    search_space:
      all: {lr: [0.001, 0.1]}           # log-uniform: both ends > 0 and log is the default
      delta: {alpha: {low: 0.001, high: 1, log: true}, beta: null}  # null: not tuned
      l2: {weight_decay: {choices: [0.0001, 0.001]}}
      l2sp: {beta: 0.01}                # a single value: fixed, not tuned

With ``--sampler grid`` a range is tried at ``grid`` points (default: both ends and the
geometric or arithmetic middle), a ``choices`` entry at each choice.

Example:
    >>> space = method_space("l2sp")
    >>> sorted(space), space["alpha"].low, space["alpha"].log
    (['alpha', 'beta', 'lr'], 0.0001, True)
    >>> user = parse_search_space({"all": {"lr": [0.01, 0.1]}, "l2": {"weight_decay": None}})
    >>> space = method_space("l2", user)
    >>> [round(x, 4) for x in space["lr"].grid_points()], list(space)
    ([0.01, 0.0316, 0.1], ['lr'])
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, get_type_hints

from deltaft.app.errors import SettingError
from deltaft.app.methods import BASE_METHODS, PART_SETTINGS, RECIPES, MethodSpec

__all__ = ["ALL", "DEFAULT_SPACES", "Param", "method_space", "parse_search_space"]

ALL = "all"


@dataclass(frozen=True)
class Param:
    """One tuned setting: a range (``low``..``high``, log-uniform when ``log``) or ``choices``.

    ``grid``: the values ``--sampler grid`` tries (default: see :meth:`grid_points`).
    """

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = True
    choices: tuple[Any, ...] | None = None
    grid: tuple[Any, ...] | None = None
    integer: bool = False

    def grid_points(self) -> list[Any]:
        """``grid``, else ``choices``, else ``[low, middle, high]`` (geometric middle when
        ``log``), rounded for integers."""
        if self.grid is not None:
            return list(self.grid)
        if self.choices is not None:
            return list(self.choices)
        assert self.low is not None and self.high is not None
        middle = math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2
        points = [self.low, middle, self.high]
        return sorted({round(p) for p in points}) if self.integer else points

    def describe(self) -> str:
        """``lr: log-uniform [0.0001, 0.1]`` or ``lr: one of 0.01, 0.1``, and the grid when one
        is given (a study is bound to these descriptions: a changed grid is another space)."""
        grid = f" (grid {', '.join(map(str, self.grid))})" if self.grid is not None else ""
        if self.choices is not None:
            return f"{self.name}: one of {', '.join(map(str, self.choices))}{grid}"
        kind = "log-uniform" if self.log else "uniform"
        integer = " integer" if self.integer else ""
        return f"{self.name}: {kind}{integer} [{self.low:g}, {self.high:g}]{grid}"


def _range(name: str, low: float, high: float, log: bool = True) -> Param:
    return Param(name, low, high, log)


#: The default spaces, keyed by ``all``, a base method or a recipe: one line per setting.
DEFAULT_SPACES: dict[str, dict[str, Param]] = {
    ALL: {"lr": _range("lr", 1e-4, 1e-1)},
    "l2": {"weight_decay": _range("weight_decay", 1e-6, 1e-2)},
    "l2sp": {"alpha": _range("alpha", 1e-4, 1.0), "beta": _range("beta", 1e-4, 1.0)},
    "fm": {"alpha": _range("alpha", 1e-4, 1.0), "beta": _range("beta", 1e-4, 1.0)},
    "delta": {"alpha": _range("alpha", 1e-4, 1.0), "beta": _range("beta", 1e-4, 1.0)},
    "cotuning": {
        "cotuning_trade_off": _range("cotuning_trade_off", 0.1, 10.0),
        "weight_decay": _range("weight_decay", 1e-6, 1e-2),
    },
    "lwf": {
        "lwf_trade_off": _range("lwf_trade_off", 0.05, 5.0),
        "weight_decay": _range("weight_decay", 1e-6, 1e-2),
    },
    "spd": {"spd_lambda": _range("spd_lambda", 0.1, 2.0)},  # the authors give no default
    # recipes; +wise has none: its alpha is chosen on validation inside each run
    "bss": {"bss_eta": _range("bss_eta", 1e-4, 1e-1)},
    "lpft": {"lp_lr": _range("lp_lr", 1e-3, 1.0)},
}

_NOT_TUNED = ("data", "model", "out", "weights", "method", "seed", "resume", "device")


def _tunable() -> dict[str, Any]:
    """Settings a space may name, with their types (numbers, strings and Literal choices)."""
    from deltaft.app.config import TrainConfig

    hints = get_type_hints(TrainConfig)
    return {
        f.name: hints[f.name] for f in dataclasses.fields(TrainConfig) if f.name not in _NOT_TUNED
    }


def _is_int(hint: Any) -> bool:
    return hint is int or (
        hasattr(hint, "__args__") and int in hint.__args__ and float not in hint.__args__
    )


def _param(where: str, name: str, value: Any, hint: Any) -> Param | None:
    """A user entry as a :class:`Param`; ``None`` for ``null`` (not tuned)."""
    integer = _is_int(hint)
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        value = {"low": value[0], "high": value[1]} if len(value) == 2 else {"bad": value}
    if not isinstance(value, Mapping):  # a single value: fixed
        return Param(name, choices=(value,), integer=integer)
    unknown = sorted(set(value) - {"low", "high", "log", "choices", "grid"})
    if unknown:
        raise ValueError(
            f"{where}: {', '.join(map(str, unknown))} is not a key of a range; expected "
            "[LOW, HIGH], {low: L, high: H, log: true|false, grid: [...]}, {choices: [...]}, "
            "a single value (fixed) or null (not tuned)."
        )
    grid = tuple(value["grid"]) if value.get("grid") is not None else None
    if "choices" in value:
        choices = value["choices"]
        if not isinstance(choices, (list, tuple)) or not choices:
            raise ValueError(f"{where}: choices must be a non-empty list, got {choices!r}.")
        return Param(name, choices=tuple(choices), grid=grid, integer=integer)
    try:
        low, high = float(value["low"]), float(value["high"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"{where}: a range needs numbers low and high, got {dict(value)!r}; e.g. [0.0001, 0.1]."
        ) from None
    log = value.get("log", True)
    if not isinstance(log, bool):
        raise ValueError(f"{where}: log must be true or false, got {log!r}.")
    if not low < high:
        raise ValueError(f"{where}: low must be below high, got [{low:g}, {high:g}].")
    if log and low <= 0:
        raise ValueError(
            f"{where}: a log-uniform range needs low > 0, got {low:g}; set log: false or a "
            "positive low."
        )
    outside = [g for g in grid or () if not low <= float(g) <= high]
    if outside:
        raise ValueError(f"{where}: grid points {outside} lie outside [{low:g}, {high:g}].")
    return Param(name, low, high, log, grid=grid, integer=integer)


def parse_search_space(
    value: Any, origin: str = "search_space"
) -> dict[str, dict[str, Param | None]]:
    """Check a ``search_space`` mapping (see the module docstring) and parse its entries.

    Keys are ``all``, a base method, a recipe or a method spec; each maps setting names to
    ranges. A ``None`` entry means "not tuned" (the base configuration's value).

    Raises:
        ValueError: not a mapping, an unknown key or setting, a malformed range, or a range
            whose ends are not valid values of the setting.
    """
    from deltaft.app.config import TrainConfig

    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{origin} must be a mapping of method -> settings, got {value!r}.")
    tunable = _tunable()
    spaces: dict[str, dict[str, Param | None]] = {}
    for key, entries in value.items():
        name = str(key).strip().lower()
        if name != ALL and name not in RECIPES:
            try:
                name = str(MethodSpec.parse(name))
            except ValueError:
                raise ValueError(
                    f"{origin}: {key!r} is not '{ALL}', a base method ({', '.join(BASE_METHODS)}), "
                    f"a recipe ({', '.join(RECIPES)}) or a method spec."
                ) from None
        if not isinstance(entries, Mapping):
            raise ValueError(f"{origin}.{key} must map settings to ranges, got {entries!r}.")
        parsed: dict[str, Param | None] = {}
        for setting, spec in entries.items():
            setting_name = str(setting).replace("-", "_")
            where = f"{origin}.{key}.{setting}"
            if setting_name not in tunable:
                raise ValueError(
                    f"{where}: not a setting that can be tuned; e.g. lr, alpha, beta, "
                    "weight_decay, batch_size (a setting of `deltaft train`)."
                )
            param = _param(where, setting_name, spec, tunable[setting_name])
            if param is not None:
                _check_values(where, param, TrainConfig)
            parsed[setting_name] = param
        spaces[name] = parsed
    return spaces


def _check_values(where: str, param: Param, config: Any) -> None:
    """Every end, choice and grid point must be a valid value of the setting."""
    values = [*(param.choices or ()), *(param.grid or ())]
    if param.low is not None:
        values += [param.low, param.high]
    for value in values:
        probe = (
            int(value)
            if param.integer and isinstance(value, float) and value.is_integer()
            else value
        )
        try:
            config(data="d", model="m", out="o", **{param.name: probe})
        except ValueError as error:
            raise ValueError(f"{where}: {value!r} is not a valid {param.name}: {error}") from None


def method_space(
    method: str, overrides: Mapping[str, Mapping[str, Param | None]] | None = None
) -> dict[str, Param]:
    """The space of ``method`` (a spec): defaults for ``all``, base, recipes, then ``overrides``
    for the same keys and for the spec itself; entries set to ``None`` are dropped.

    Raises:
        SettingError: the space tunes a setting the method ignores
            (:data:`~deltaft.app.methods.PART_SETTINGS`, e.g. ``bss_eta`` without ``+bss``).
    """
    spec = MethodSpec.parse(method)
    keys = [ALL, spec.base, *spec.recipes]
    merged: dict[str, Param | None] = {}
    for key in keys:
        merged.update(DEFAULT_SPACES.get(key, {}))
    for key in [*keys, str(spec)]:
        merged.update((overrides or {}).get(key, {}))
    space = {name: param for name, param in merged.items() if param is not None}
    ignored = [name for name in spec.unused_settings if name in space]
    if ignored:
        owners = sorted(
            {part for part, names in PART_SETTINGS.items() if set(names) & set(ignored)}
        )
        raise SettingError(
            f"The search space of {spec} tunes {', '.join(ignored)}, which {spec} does not use "
            f"(it belongs to {', '.join(owners)}); put it under that method or recipe in "
            "search_space."
        )
    return space
