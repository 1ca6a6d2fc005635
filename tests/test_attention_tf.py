"""Channel attention on transformers and the replay's fidelity (issue #11, second part).

The attention head's lr follows the reference's ExponentialLR; the fx replay repeats only the
values that carry the batch; exact scores equal the per-channel loop on small ViT/Swin/token
models.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close

from deltaft.attention import channel_removal_scores, estimate_channel_attention
from tests.reference import ref_removal_scores, ref_removal_scores_last_axis


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


# --- the replay repeats only what carries the batch -----------------------------------------
class _PrototypeToy(nn.Module):
    """A conv, then a prototype head whose rows are read by the input's channel count.

    ``self.prototypes[: x.shape[1]]`` depends on the input only through its shape: a (3, 4)
    constant. With a batch of 3 its first dimension equals the batch size, and repeating it with
    the replicas would give ``K * 3`` classes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.prototypes = nn.Parameter(torch.randn(8, 4))
        self.register_buffer("offset", torch.randn(3, 4))  # a (3, 4) constant: never repeated

    def forward(self, x: Tensor) -> Tensor:
        features = self.conv(x).mean(dim=(2, 3)) + self.offset.sum(0)  # (B, 4)
        prototypes = self.prototypes[: x.shape[1]]  # (3, 4): as many as input channels
        return nn.functional.linear(features, prototypes + self.offset)  # (B, 3)


class _SeqFirstToy(nn.Module):
    """Tokens moved to (N, B, C) before the layer's downstream part reads them (N == B)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 4, 2, stride=2)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.embed(x).flatten(2).permute(2, 0, 1)  # (N, B, C), N = 4 for 4x4 px
        skip = tokens.mean(0, keepdim=True).expand_as(tokens)  # (N, B, C), input-dependent
        mixed = self.mix(self.embed(x).flatten(2).transpose(1, 2))  # (B, N, C): the layer
        return self.head((mixed.transpose(0, 1) + skip).mean(0))  # (B, 3)


def _float64(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    return model.double().eval()


def _data(n: int, batch: int, size: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, 3, size, size, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (batch,), generator=gen),
        )
        for _ in range(n)
    ]


@pytest.mark.parametrize("chunk", [1, 2, None])
def test_replay_does_not_repeat_a_constant_whose_first_dim_is_the_batch(chunk: int | None) -> None:
    model = _float64(_PrototypeToy())
    batches = _data(2, 3, 6, seed=1)  # batch 3 == the prototypes' first dimension
    got = channel_removal_scores(
        model, batches, ["conv"], n_batches=2, method="exact", chunk_size=chunk
    )
    want = ref_removal_scores(model, batches, ["conv"])
    assert_close(got["conv"], want["conv"], rtol=1e-9, atol=1e-12)


def test_replay_repeats_a_value_along_its_batch_axis(caplog: pytest.LogCaptureFixture) -> None:
    model = _float64(_SeqFirstToy())
    batches = _data(2, 4, 4, seed=2)  # batch 4 == tokens N: (N, B, C) has B second
    with caplog.at_level(logging.WARNING, logger="deltaft.attention"):
        got = channel_removal_scores(
            model, batches, ["mix"], n_batches=2, method="exact", chunk_size=2, layouts="BNC"
        )
    assert "full forwards" not in caplog.text  # replayed, not scored by the fallback
    want = ref_removal_scores_last_axis(model, batches, ["mix"])
    assert_close(got["mix"], want["mix"], rtol=1e-9, atol=1e-12)


# --- exact == reference on small transformers -----------------------------------------------
def _timm_vit(reg_tokens: int = 0) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=16, patch_size=8, embed_dim=8, depth=2, num_heads=2, num_classes=3,
        reg_tokens=reg_tokens,
    )  # fmt: skip


def _torchvision_swin() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[2, 2], window_size=[2, 2],
        num_classes=3,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    ("build", "layers", "size"),
    [
        (_timm_vit, ["blocks.0", "blocks.1", "norm"], 16),
        (lambda: _timm_vit(reg_tokens=2), ["blocks.0", "blocks.1"], 16),  # 3 prefix tokens
        (_torchvision_swin, ["features.1", "features.3", "features.0"], 16),
    ],
    ids=["timm-vit", "timm-vit-prefix-tokens", "torchvision-swin"],
)
def test_exact_equals_reference_on_small_transformers(
    build: Any, layers: list[str], size: int, caplog: pytest.LogCaptureFixture
) -> None:
    model = _float64(build())
    batches = _data(2, 2, size, seed=3)
    with caplog.at_level(logging.WARNING, logger="deltaft.attention"):
        got = channel_removal_scores(model, batches, layers, n_batches=2, chunk_size=3)
    assert "full forwards" not in caplog.text  # the fx replay ran on every layer
    want = ref_removal_scores_last_axis(model, batches, layers)
    for name in layers:
        assert got[name].shape == want[name].shape
        assert float(want[name].abs().max()) > 1e-6  # the scores say something
        assert_close(got[name], want[name], rtol=1e-9, atol=1e-12)
