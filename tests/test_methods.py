"""Method specs: every spec parses to one canonical form or fails with a message that lists the
valid names; the config stores the canonical form; compare takes the same specs."""

from __future__ import annotations

import itertools

import pytest

from deltaft.app.compare import parse_methods
from deltaft.app.config import TrainConfig
from deltaft.app.errors import SettingError
from deltaft.app.methods import BASE_METHODS, RECIPES, MethodSpec

REQUIRED = {"data": "d", "model": "m", "out": "o"}


def test_every_combination_parses_in_any_order_to_one_canonical_spec() -> None:
    for base in BASE_METHODS:
        for count in range(len(RECIPES) + 1):
            for chosen in itertools.combinations(RECIPES, count):
                canonical = "+".join((base, *chosen))
                for order in itertools.permutations(chosen):
                    spec = MethodSpec.parse("+".join((base, *order)))
                    assert str(spec) == canonical
                    assert spec.base == base and spec.recipes == chosen
                    assert MethodSpec.parse(str(spec)) == spec


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", r"empty part"),
        ("delta+", r"empty part"),
        ("delta++bss", r"empty part"),
        ("delta2", r"Unknown base method 'delta2'.*l2, l2sp, fm, delta, cotuning, lwf, spd"),
        ("bss+delta", r"Unknown base method 'bss'.*a recipe comes after a base method"),
        ("delta+lpft+foo", r"Unknown recipe\(s\) 'foo'.*\+bss, \+lpft, \+wise"),
        ("delta+l2sp", r"Unknown recipe\(s\) 'l2sp'"),
        ("delta+bss+BSS", r"Recipe\(s\) bss given twice"),
    ],
)
def test_bad_specs_fail_with_the_valid_names(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MethodSpec.parse(text)


def test_config_stores_the_canonical_spec_and_names_the_setting() -> None:
    cfg = TrainConfig(**REQUIRED, method="Delta + WISE+bss")
    assert cfg.method == "delta+bss+wise"
    assert cfg.spec == MethodSpec("delta", ("bss", "wise"))
    with pytest.raises(SettingError, match=r"^method: Unknown recipe") as info:
        TrainConfig(**REQUIRED, method="delta+fast")
    assert info.value.settings == ("method",)


def test_compare_takes_specs_and_scratch() -> None:
    assert parse_methods("l2, delta+wise+lpft ,scratch,l2sp+bss") == [
        "l2",
        "delta+lpft+wise",
        "scratch",
        "l2sp+bss",
    ]
    with pytest.raises(ValueError, match=r"given more than once"):
        parse_methods("delta+lpft+wise,delta+wise+lpft")
    with pytest.raises(ValueError, match=r"Unknown recipe.*or 'scratch'"):
        parse_methods("l2,delta+x")
    with pytest.raises(ValueError, match=r"No method"):
        parse_methods(" , ")
