"""Helpers shared by the end-to-end CLI tests (test_cli.py, test_faults.py)."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from deltaft.cli import main
from deltaft.cli.options import message

MODEL = "tests.toy_models:tiny_cnn"
CLASSES = ("ant", "bee", "cat", "dog")
TIMING_KEYS = ("seconds", "images_per_s")


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: one thread avoids OpenMP contention on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="module")
def restore_logging() -> Iterator[None]:
    """main() configures the 'deltaft' logger; leave it as other test modules expect it."""
    log = logging.getLogger("deltaft")
    level, handlers = log.level, list(log.handlers)
    yield
    log.setLevel(level)
    log.handlers[:] = handlers


def write_images(
    root: Path, split: str, per_class: int, seed: int, *, gray_index: int | None = None
) -> None:
    """``root/split/<class>/<i>.png``, 24x24, the class set by brightness.

    Image number ``gray_index`` of each class is saved in mode L (the loader converts it).
    """
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (24, 24, 3)) + 60 * label  # class = brightness
            image = Image.fromarray(pixels.astype(np.uint8))
            image = image.convert("L") if i == gray_index else image
            image.save(folder / f"{i}.png")


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``deltaft.cli.main(argv)`` in-process: exit code, stdout, stderr."""
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def load_state(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)  # type: ignore[no-any-return]


@contextlib.contextmanager
def raises_rendered(
    expected: type[BaseException] | tuple[type[BaseException], ...], match: str
) -> Iterator[None]:
    """``pytest.raises(expected)``, with ``match`` searched in the message as the command line
    prints it (a :class:`~deltaft.app.errors.SettingError` names flags there: ``--lr``)."""
    with pytest.raises(expected) as info:
        yield
    assert re.search(match, message(info.value)), message(info.value)
