"""Channel attention on transformers and the replay's fidelity (issue #11, second part).

The attention head's lr follows the reference's ExponentialLR; the fx replay repeats only the
values that carry the batch; exact scores equal the per-channel loop on small ViT/Swin/token
models.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn

from deltaft.attention import estimate_channel_attention


# --- the attention head's schedule ----------------------------------------------------------
class _HeadToy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


class _RecordingSGD(torch.optim.SGD):
    """SGD that records the lr of each step."""

    lrs: ClassVar[list[float]] = []

    def step(self, closure: Any = None) -> Any:
        type(self).lrs.append(float(self.param_groups[0]["lr"]))
        return super().step(closure)


def test_head_lr_decays_exponentially_per_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.optim, "SGD", _RecordingSGD)
    _RecordingSGD.lrs = []
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 8, 8, generator=gen), torch.tensor([0, 1, 2, 0]))]
    estimate_channel_attention(_HeadToy(), batches, ["conv"], 3, epochs=10, lr=0.01, n_batches=1)
    gamma = math.exp(math.log(0.1) / 6)  # the reference's ExponentialLR factor per epoch
    want = [0.01 * gamma**epoch for epoch in range(10)]  # one batch per epoch: one step each
    assert _RecordingSGD.lrs == pytest.approx(want, rel=1e-12)
    assert _RecordingSGD.lrs[6] == pytest.approx(0.001, rel=1e-12)  # x0.1 after 6 epochs
