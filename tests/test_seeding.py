"""Per-sample augmentation seeds (app.data.seeding): the same crops as seeding torch globally,
without its per-image cost, and nothing left behind in the process's generators."""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from deltaft.app.data import SampleSeeds, SeededDataset
from deltaft.app.data.seeding import sample_seed


class _Augmented(Dataset[Any]):
    """Random crops and flips of fixed images, drawn from torch's global RNG."""

    def __init__(self, n: int = 6) -> None:
        gen = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, 12, 12, generator=gen)
        self.transform = v2.Compose(
            [v2.RandomResizedCrop(8, scale=(0.25, 1.0), antialias=True), v2.RandomHorizontalFlip()]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        # the raw draw shows that the seed reaches the RNG even where the crop would not differ
        return self.transform(self.images[index]), torch.rand(3)


class _Failing(Dataset[Any]):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> Any:
        torch.rand(5)  # moves the generator before failing
        raise OSError("unreadable")


def test_sample_seed_is_the_documented_sha256() -> None:
    for base, epoch_pass, index in [(0, 0, 0), (7, 2, 3), (2**63 - 1, 1, 2999), (-1, 0, 5)]:
        mask = (1 << 64) - 1
        packed = struct.pack("<3Q", base & mask, epoch_pass & mask, index & mask)
        expected = int.from_bytes(hashlib.sha256(packed).digest()[:8], "little") >> 1
        assert sample_seed(base, epoch_pass, index) == expected < 2**63


def test_seeded_items_equal_the_global_seed_reference_and_leave_the_rng_alone() -> None:
    data = _Augmented()
    seeded = SeededDataset(data)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    keys = [(i, sample_seed(5, p, i)) for p in (0, 1) for i in range(len(data))]
    got = [seeded[key] for key in keys]
    assert torch.equal(torch.get_rng_state(), before)  # restored after every item
    for (index, seed), (image, draw) in zip(keys, got, strict=True):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the reference: what the loader did before, bit for bit
            ref_image, ref_draw = data[index]
        torch.testing.assert_close(image, ref_image, rtol=0, atol=0)
        torch.testing.assert_close(draw, ref_draw, rtol=0, atol=0)
    # another pass draws other numbers for the same image
    assert not torch.equal(got[0][1], got[len(data)][1])


def test_seeded_items_do_not_seed_other_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.manual_seed queues a lazy seed, with a formatted stack, for CUDA, XPU and MTIA: a
    # few tenths of a millisecond per image that made the demo slower; only the CPU is seeded.
    def refuse(seed: int) -> None:
        raise AssertionError("SeededDataset must seed torch.default_generator only")

    monkeypatch.setattr(torch, "manual_seed", refuse)
    monkeypatch.setattr(torch.random, "manual_seed", refuse)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", refuse)
    image, _ = SeededDataset(_Augmented())[(1, sample_seed(0, 0, 1))]
    assert image.shape == (3, 8, 8)


def test_a_failing_item_restores_the_rng() -> None:
    torch.manual_seed(9)
    before = torch.get_rng_state()
    with pytest.raises(OSError, match="unreadable"):
        SeededDataset(_Failing())[(0, 42)]
    assert torch.equal(torch.get_rng_state(), before)


def test_sample_seeds_pass_counts_iterations_without_reseeding() -> None:
    gen = torch.Generator().manual_seed(11)
    sampler = SampleSeeds(torch.utils.data.SequentialSampler(range(3)), gen)
    first, second = list(sampler), list(sampler)
    assert first == [(i, sample_seed(11, 0, i)) for i in range(3)]
    assert second == [(i, sample_seed(11, 1, i)) for i in range(3)]
    gen.manual_seed(12)  # a new epoch's seed starts the passes again
    assert list(sampler) == [(i, sample_seed(12, 0, i)) for i in range(3)]
    assert len(sampler) == 3
