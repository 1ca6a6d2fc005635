"""Shared fixtures: tiny models and generated data, all seeded and offline."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
import torch
from torch import nn


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``-n N``) each worker runs one torch thread: N workers with a thread
    per core each contend for the cores (on a loaded 2-core machine one float64 attention test
    took 238 s with 2 threads, under 23 s in a one-thread worker). Subprocesses the tests start
    inherit it through ``OMP_NUM_THREADS``."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_deltaft_logger() -> Iterator[None]:
    """``deltaft.cli.main`` attaches a console handler to the ``deltaft`` logger; a test that
    calls it must not leave that handler to print into the next test's captured stderr."""
    log = logging.getLogger("deltaft")
    level, handlers, propagate = log.level, list(log.handlers), log.propagate
    yield
    log.setLevel(level)
    log.handlers[:] = handlers
    log.propagate = propagate


class TinyNet(nn.Module):
    """A small residual CNN with BatchNorm: stem -> block1 (skip) -> block2 (stride 2) -> fc."""

    def __init__(self, num_classes: int = 4, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.bn1(self.conv1(x)) + x)
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


@pytest.fixture
def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 16, 16, generator=gen), torch.randint(0, 4, (6,), generator=gen)
