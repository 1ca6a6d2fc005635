"""Per-sample augmentation seeds: the random crops and flips of an image depend on the loader's
seed, the pass over the data and the image's index, never on the number of DataLoader workers
or on which worker loads it.

Without this, torchvision's random transforms draw from the RNG of the process that loads the
image: the main process with ``num_workers=0``, else a worker seeded with ``base_seed +
worker_id``, each worker drawing for the images it happens to get. The same settings with 0, 1
or 2 workers then train on other crops, and a run resumed with another worker count differs
from the uninterrupted one.

:class:`SampleSeeds` wraps the index sampler (in the main process) and yields ``(index, seed)``;
:class:`SeededDataset` loads ``dataset[index]`` with torch's CPU RNG seeded from ``seed`` and
restores that RNG afterwards, so loading in the main process leaves its RNG as it was; the RNGs
of other devices are not touched.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["SampleSeeds", "SeededDataset", "sample_seed"]

_MASK = (1 << 64) - 1


def sample_seed(base: int, epoch_pass: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` in pass ``epoch_pass`` of a loader seeded with ``base``:
    the first 8 bytes of ``sha256`` over the three numbers (64-bit little-endian each), as a
    little-endian integer shifted right by 1.

    Example:
        >>> sample_seed(7, 0, 3) == sample_seed(7, 0, 3) != sample_seed(7, 0, 4)
        True
    """
    packed = struct.pack("<3Q", base & _MASK, epoch_pass & _MASK, index & _MASK)
    return int.from_bytes(hashlib.sha256(packed).digest()[:8], "little") >> 1


class SampleSeeds(Sampler[tuple[int, int]]):
    """``(index, sample_seed(base, pass, index))`` for every index of ``sampler``.

    ``base`` is ``generator.initial_seed()``: the seed the generator was last given with
    ``manual_seed`` (the training loop gives it ``(seed, "order", epoch)`` before every epoch).
    ``pass`` counts the iterations since that seed was set (0 for the first), so that a loader
    iterated several times without reseeding (attention estimation over several epochs) draws
    new crops each time. Reading the seed draws nothing from the generator: the data order is
    the same as without this wrapper.
    """

    def __init__(self, sampler: Sampler[int], generator: torch.Generator) -> None:
        self.sampler = sampler
        self.generator = generator
        self._base: int | None = None
        self._pass = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        base = self.generator.initial_seed()
        self._pass = self._pass + 1 if base == self._base else 0
        self._base = base
        epoch_pass = self._pass
        for index in self.sampler:
            yield int(index), sample_seed(base, epoch_pass, int(index))

    def __len__(self) -> int:
        if not isinstance(self.sampler, Sized):
            raise TypeError(f"{type(self.sampler).__name__} has no length")
        return len(self.sampler)


class SeededDataset(Dataset[Any]):
    """``dataset[index]`` loaded with torch's CPU RNG seeded from ``seed``, for ``(index, seed)``
    keys (:class:`SampleSeeds`); the RNG state is restored afterwards.

    Torchvision's random transforms draw from that RNG, so an image's crop and flip depend only
    on its seed. A transform that draws from Python's ``random`` or NumPy is not covered.
    """

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        # The CPU generator only: torch.manual_seed also queues a lazy seed for CUDA, XPU and
        # MTIA, each recording a formatted stack (0.3 ms or more an image, seconds a run), and
        # would reseed those devices; fork_rng(devices=[]) restored only the CPU state anyway.
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.dataset!r})"
