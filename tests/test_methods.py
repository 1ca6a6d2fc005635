"""Method specs: every spec parses to one canonical form or fails with a message that lists the
valid names; the config stores the canonical form; compare takes the same specs."""

from __future__ import annotations

import dataclasses
import itertools
import logging

import pytest

from deltaft.app.compare import parse_methods
from deltaft.app.config import TrainConfig
from deltaft.app.errors import SettingError
from deltaft.app.methods import (
    BASE_METHODS,
    PART_SETTINGS,
    RECIPES,
    MethodSpec,
    for_method,
    ignored_settings,
    warn_ignored_settings,
)

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


def _every_spec() -> list[str]:
    return [
        "+".join((base, *chosen))
        for base in BASE_METHODS
        for count in range(len(RECIPES) + 1)
        for chosen in itertools.combinations(RECIPES, count)
    ]


def test_the_table_of_part_settings_names_parts_and_settings() -> None:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(PART_SETTINGS) <= set(BASE_METHODS) | set(RECIPES)
    assert {name for names in PART_SETTINGS.values() for name in names} <= fields
    assert MethodSpec.parse("l2+wise").settings == {
        "wise_alphas", "wise_bn_batches", "lp_epochs", "lp_lr"
    }  # fmt: skip
    assert MethodSpec.parse("delta+bss").unused_settings == (
        "cotuning_trade_off", "cotuning_relationship", "lwf_trade_off", "lwf_temperature",
        "spd_lambda", "lp_epochs", "lp_lr", "wise_alphas", "wise_bn_batches",
    )  # fmt: skip


def test_settings_a_spec_does_not_use_are_named_in_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = TrainConfig(
        **REQUIRED, method="l2", layers=["a"], lwf_temperature=2.0, bss_eta=0.1, lp_lr=0.1,
        bss_k=1,  # the default: not named
    )  # fmt: skip
    assert ignored_settings(cfg) == ["layers", "lwf_temperature", "bss_eta", "lp_lr"]
    used = TrainConfig(
        **REQUIRED, method="delta+wise+bss", layers=["a"], attention="a.pt", bss_eta=0.1,
        lp_lr=0.1,  # +wise uses the probe's settings (its theta_0 head)
    )  # fmt: skip
    lwf = TrainConfig(**REQUIRED, method="lwf", lwf_temperature=2.0)
    with caplog.at_level(logging.WARNING, logger="deltaft"):
        for config in (cfg, used, lwf):
            warn_ignored_settings(config)
        warn_ignored_settings(TrainConfig(**REQUIRED, method="delta", lwf_temperature=2.0))
    assert [r.getMessage() for r in caplog.records] == [
        "--layers, --lwf-temperature, --bss-eta, --lp-lr ignored: method l2 does not use them.",
        "--lwf-temperature ignored: method delta does not use it.",
    ]


def test_for_method_resets_what_the_method_does_not_use_and_keeps_the_rest() -> None:
    base = TrainConfig(
        **REQUIRED, method="delta+bss", layers=["a"], attention="a.pt", bss_eta=0.1, lp_lr=0.5,
        spd_lambda=0.3, lr=0.05, seed=3,
    )  # fmt: skip
    wise = for_method(base, "l2+wise", seed=4)
    assert (wise.method, wise.layers, wise.attention, wise.bss_eta, wise.spd_lambda) == (
        "l2+wise", None, None, 0.001, 1.0
    )  # fmt: skip
    assert (wise.lp_lr, wise.lr, wise.seed) == (0.5, 0.05, 4)  # used, shared, changed
    fm = for_method(base, "fm+bss")
    assert (fm.layers, fm.attention, fm.bss_eta) == (["a"], None, 0.1)
    for spec in _every_spec():
        assert ignored_settings(for_method(base, spec)) == []
