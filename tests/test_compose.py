"""Base methods that keep the source head or anchor in the optimizer (issue 14) combined with the
recipes (issue 13): each part of a spec does its own work in one run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltaft.app.train import run_training
from tests.test_recipes import _cfg, _rows, _summary, data  # noqa: F401 (fixture)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "terms"),
    [
        ("cotuning+bss+lpft+wise", {"train/reg/cotuning", "train/reg/bss"}),
        ("lwf+lpft", {"train/reg/lwf"}),
        ("spd+bss+wise", {"train/reg/bss"}),
    ],
)
def test_every_part_of_a_composed_spec_takes_effect(
    data: Path,  # noqa: F811 (the fixture)
    tmp_path: Path,
    method: str,
    terms: set[str],
) -> None:
    run = tmp_path / "run"
    summary = run_training(_cfg(data, run, method, wise_alphas=[0.0, 1.0]))
    assert summary["method"] == method
    (row,) = _rows(run)
    regularizers = {key for key in row if key.startswith("train/reg/")}
    assert terms <= regularizers, regularizers
    parts = sum(row[key] for key in regularizers)
    assert row["train/loss"] == pytest.approx(row["train/task_loss"] + parts, rel=1e-5)
    if "+wise" in method:
        wise = _summary(run)["wise"]
        assert wise["alpha"] in (0.0, 1.0)
        assert set(wise["val_accuracy"]) == {"0", "1"}
        assert summary["test_accuracy"] == wise["test_accuracy"]
        assert (run / "checkpoints" / "wise.pt").is_file()
    else:
        assert "wise" not in json.loads((run / "summary.json").read_text())
    if method.startswith("cotuning"):
        assert (run / "relationship.pt").is_file()
