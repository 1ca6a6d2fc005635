"""Tiny models for end-to-end tests, importable as ``--model tests.toy_models:tiny_cnn``."""

from __future__ import annotations

from torch import Tensor, nn


class TinyCNN(nn.Module):
    """Two conv stages with BatchNorm (strides 2 and 4 at the stage outputs) and a linear ``fc``."""

    def __init__(self, num_classes: int = 1000, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.stage1 = nn.Sequential(
            nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.stage2 = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage2(self.stage1(self.stem(x)))  # (B, 2w, H/8, W/8)
        return self.fc(self.pool(x).flatten(1))


def tiny_cnn(num_classes: int = 1000) -> nn.Module:
    """A :class:`TinyCNN`; the default 1000 classes play the role of an ImageNet head."""
    return TinyCNN(num_classes=num_classes)


def other_cnn(num_classes: int = 1000) -> nn.Module:
    """A wider :class:`TinyCNN`: "another model" for attention-compatibility errors."""
    return TinyCNN(num_classes=num_classes, width=12)
