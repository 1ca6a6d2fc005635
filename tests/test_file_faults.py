"""Issue #12, classes 4, 8, 9 and 10: maps of one call, settings files and attention files.

Each test reproduced its defect before the fix: a shared module compared at two different calls,
a checkpoint that makes ``eval`` import code, YAML that expands without bound or hides a
duplicate key, an attention file estimated on other data accepted silently.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from deltaft import FeatureExtractor, TransferObjective, validate_layers


# ------------------------------------------------------------------------------------------------
# Class 4: a module called more than once per forward
# ------------------------------------------------------------------------------------------------
class SharedReLU(nn.Module):
    """A ResNet-style block: one ``relu`` module called twice per forward, as torchvision does."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.conv2(self.relu(self.conv1(x))))  # (B, 4, H, W), relu called twice
        return self.fc(x.mean((2, 3)))


def test_validate_layers_refuses_a_module_called_twice() -> None:
    with pytest.raises(ValueError, match=r"Layer 'relu' of SharedReLU runs 2 times per forward"):
        validate_layers(SharedReLU(), ["relu"], input_size=8)
    assert validate_layers(SharedReLU(), ["conv2"], input_size=8) == {"conv2": (1, 4, 8, 8)}


def test_feature_extractor_refuses_a_second_call_of_one_module() -> None:
    net = SharedReLU()
    with FeatureExtractor(net, ["relu"]), pytest.raises(ValueError, match="runs more than once"):
        net(torch.randn(2, 3, 8, 8))
    with FeatureExtractor(net, ["conv1"]) as fx:  # one call per forward, popped each time
        for _ in range(2):
            net(torch.randn(2, 3, 8, 8))
            assert fx.pop()["conv1"].shape == (2, 4, 8, 8)


def test_objective_never_compares_two_calls_of_a_shared_module() -> None:
    """Before: the truncated source kept the first call, the target the last: fm > 0 at equal
    weights (90 for torchvision's ResNet-18 ``layer1.0.relu``)."""
    torch.manual_seed(0)
    model = SharedReLU()
    objective = TransferObjective(model, copy.deepcopy(model), method="fm", layers=["relu"])
    with pytest.raises(ValueError, match="'relu' runs more than once per forward"):
        objective(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
    # A module called once: identical weights give a zero penalty.
    objective = TransferObjective(model, copy.deepcopy(model), method="fm", layers=["conv2"])
    model.eval()
    out = objective(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
    assert float(out["reg/fm"].detach().sum()) == 0.0
