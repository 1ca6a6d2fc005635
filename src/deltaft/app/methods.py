"""Method specs: a base method and the recipes combined with it, ``delta+lpft+wise``.

A run fine-tunes with one **base method** (what anchors the fine-tuned network to the source)
and any of the **recipes** (what changes how training starts, what it adds to every step, or what
it does with the result). A spec is the base first, then recipes after ``+``, each at most once,
in any order; :meth:`MethodSpec.parse` writes them in one canonical order, so ``delta+wise+lpft``
and ``delta+lpft+wise`` are the same method (and the same run folder in ``compare``).

Example:
    >>> spec = MethodSpec.parse("delta+wise+lpft")
    >>> str(spec), spec.base, spec.recipes
    ('delta+lpft+wise', 'delta', ('lpft', 'wise'))
    >>> spec.has("wise"), spec.has("bss")
    (True, False)
    >>> str(MethodSpec.parse(" L2SP "))
    'l2sp'
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

__all__ = [
    "BASE_METHODS",
    "FEATURE_MAP_METHODS",
    "PART_SETTINGS",
    "RECIPES",
    "MethodSpec",
    "Settings",
    "for_method",
    "ignored_settings",
    "spec_help",
    "warn_ignored_settings",
]

logger = logging.getLogger(__name__)

#: Base methods and what each anchors. The first four regularize with a loss term
#: (:class:`~deltaft.objective.TransferObjective`); the last three keep what the source knows in
#: another way.
BASE_METHODS: dict[str, str] = {
    "l2": "weight decay toward zero (plain fine-tuning)",
    "l2sp": "L2-SP: weights pulled toward the pretrained ones (Li et al., ICML 2018)",
    "fm": "feature maps kept close to the source's, unweighted",
    "delta": "DELTA: feature maps kept close, weighted by supervised attention (ICLR 2019)",
    "cotuning": "Co-Tuning: the source head learns the target labels' source-class relationship "
    "(You et al., NeurIPS 2020)",
    "lwf": "LwF: the source head distilled from the frozen source (Li and Hoiem, 2016)",
    "spd": "SPD: selective projection decay toward the pretrained weights, an optimizer "
    "(Tian et al., NeurIPS 2024)",
}

#: Recipes, in the canonical order of a spec.
RECIPES: dict[str, str] = {
    "bss": "Batch Spectral Shrinkage of the head's input (Chen et al., NeurIPS 2019)",
    "lpft": "linear probing of the new head first, then fine-tuning (Kumar et al., ICLR 2022)",
    "wise": "WiSE-FT: weights interpolated between the source and the fine-tuned network, "
    "chosen on validation (Wortsman et al., CVPR 2022)",
}

#: Base methods that regularize feature maps (they take ``layers``).
FEATURE_MAP_METHODS: frozenset[str] = frozenset({"fm", "delta"})

#: The settings only some parts of a spec use, by part (a base method or a recipe). A spec
#: without any of a setting's parts ignores it: ``train`` warns when it is set away from its
#: default, ``compare`` and ``tune`` reset it (:func:`for_method`). ``+wise`` also uses the
#: linear probe's settings (its ``theta_0`` head).
PART_SETTINGS: dict[str, tuple[str, ...]] = {
    "fm": ("layers", "layout", "exclude_prefix_tokens"),
    "delta": ("layers", "layout", "exclude_prefix_tokens", "attention"),
    "cotuning": ("cotuning_trade_off", "cotuning_relationship"),
    "lwf": ("lwf_trade_off", "lwf_temperature"),
    "spd": ("spd_lambda",),
    "bss": ("bss_eta", "bss_k"),
    "lpft": ("lp_epochs", "lp_lr"),
    "wise": ("wise_alphas", "wise_bn_batches", "lp_epochs", "lp_lr"),
}


def spec_help() -> str:
    """One line for help texts: the base methods and the recipes."""
    return (
        f"a base method ({', '.join(BASE_METHODS)}) optionally followed by recipes "
        f"({', '.join('+' + name for name in RECIPES)}), e.g. delta+lpft+wise"
    )


@dataclass(frozen=True)
class MethodSpec:
    """A parsed method spec: :attr:`base` and :attr:`recipes` (canonical order, no repeats)."""

    base: str
    recipes: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str | MethodSpec) -> MethodSpec:
        """Parse ``"base[+recipe...]"`` (case and spaces around parts are ignored).

        Raises:
            ValueError: an empty part, an unknown base or recipe, a recipe given twice or placed
                first; the message lists the valid names.
        """
        if isinstance(text, MethodSpec):
            return text
        if not isinstance(text, str):
            raise ValueError(f"A method spec is a string like 'delta+lpft', got {text!r}.")
        parts = [part.strip().lower() for part in text.split("+")]
        if any(not part for part in parts):
            raise ValueError(f"Method spec {text!r} has an empty part; expected {spec_help()}.")
        base, recipes = parts[0], parts[1:]
        if base not in BASE_METHODS:
            where = " (a recipe comes after a base method)" if base in RECIPES else ""
            raise ValueError(
                f"Unknown base method {base!r} in {text!r}{where}; expected {spec_help()}."
            )
        unknown = [part for part in recipes if part not in RECIPES]
        if unknown:
            raise ValueError(
                f"Unknown recipe(s) {', '.join(map(repr, unknown))} in {text!r}; expected "
                f"{spec_help()}."
            )
        repeated = sorted({part for part in recipes if recipes.count(part) > 1})
        if repeated:
            raise ValueError(f"Recipe(s) {', '.join(repeated)} given twice in {text!r}.")
        return cls(base, tuple(name for name in RECIPES if name in recipes))

    def has(self, recipe: str) -> bool:
        """Whether the spec includes ``recipe`` (a name of :data:`RECIPES`)."""
        if recipe not in RECIPES:
            raise ValueError(f"Unknown recipe {recipe!r}; expected one of {', '.join(RECIPES)}.")
        return recipe in self.recipes

    @property
    def feature_maps(self) -> bool:
        """Whether the base method regularizes feature maps (``fm``, ``delta``)."""
        return self.base in FEATURE_MAP_METHODS

    @property
    def settings(self) -> frozenset[str]:
        """The settings of :data:`PART_SETTINGS` that this spec's parts use."""
        parts = (self.base, *self.recipes)
        return frozenset(name for part in parts for name in PART_SETTINGS.get(part, ()))

    @property
    def unused_settings(self) -> tuple[str, ...]:
        """The settings of :data:`PART_SETTINGS` this spec ignores, in the table's order."""
        names = dict.fromkeys(name for names in PART_SETTINGS.values() for name in names)
        return tuple(name for name in names if name not in self.settings)

    def __str__(self) -> str:
        return "+".join((self.base, *self.recipes))


class Settings(Protocol):
    """What the functions below read of a :class:`~deltaft.app.config.TrainConfig` (typed this
    way because the config imports this module)."""

    __dataclass_fields__: ClassVar[dict[str, Any]]
    method: str

    @property
    def spec(self) -> MethodSpec: ...


_Config = TypeVar("_Config", bound=Settings)


def _defaults(cfg: Settings) -> dict[str, Any]:
    defaults: dict[str, Any] = {}
    for field in dataclasses.fields(cfg):
        factory = field.default_factory
        defaults[field.name] = field.default if factory is dataclasses.MISSING else factory()
    return defaults


def ignored_settings(cfg: Settings) -> list[str]:
    """The settings ``cfg``'s spec ignores that are set away from their defaults."""
    defaults = _defaults(cfg)
    return [name for name in cfg.spec.unused_settings if getattr(cfg, name) != defaults[name]]


def warn_ignored_settings(cfg: Settings) -> None:
    """One warning naming the flags of :func:`ignored_settings`, if any."""
    ignored = ignored_settings(cfg)
    if ignored:
        flags = ", ".join("--" + name.replace("_", "-") for name in ignored)
        pronoun = "it" if len(ignored) == 1 else "them"
        logger.warning("%s ignored: method %s does not use %s.", flags, cfg.method, pronoun)


def for_method(cfg: _Config, method: str | MethodSpec, **changes: Any) -> _Config:
    """``cfg`` trained with ``method`` (and ``changes``): the settings the method ignores return
    to their defaults, so that runs of several methods from one base config differ only in
    what each method uses (``compare``, ``tune``)."""
    spec = MethodSpec.parse(method)
    defaults = _defaults(cfg)
    reset = {name: defaults[name] for name in spec.unused_settings}
    return dataclasses.replace(cfg, **{**reset, "method": str(spec), **changes})
