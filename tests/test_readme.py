from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return next(b for b in blocks if "TransferObjective(model, source" in b)


def test_readme_example_is_the_quickstart_file() -> None:
    assert _readme_example() == (ROOT / "examples" / "quickstart.py").read_text()
    assert len(_readme_example().strip().splitlines()) <= 30


def test_quickstart_runs(capsys: pytest.CaptureFixture[str]) -> None:
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4  # one line per batch of 16 out of 64 images
    assert all("reg/delta" in line and "task_loss" in line for line in lines)
