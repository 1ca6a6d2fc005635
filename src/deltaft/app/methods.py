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

from dataclasses import dataclass

__all__ = ["BASE_METHODS", "FEATURE_MAP_METHODS", "RECIPES", "MethodSpec", "spec_help"]

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

    def __str__(self) -> str:
        return "+".join((self.base, *self.recipes))
