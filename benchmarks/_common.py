"""Shared set-up for the benchmarks: models with random weights, synthetic batches, timing."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
import torchvision
from torch import nn

from deltaft import replace_head

MODELS: dict[str, Callable[[], nn.Module]] = {
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(),
    "resnet50": lambda: torchvision.models.resnet50(),
}


def source_and_model(name: str, num_classes: int = 10) -> tuple[nn.Module, nn.Module]:
    """A random-weight source (ImageNet head) and its copy with a new head."""
    torch.manual_seed(0)
    source = MODELS[name]().eval()
    model = copy.deepcopy(source)
    replace_head(model, num_classes)
    return source, model


def batch(size: int, image: int, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(size, 3, image, image, generator=gen)
    return x, torch.randint(0, num_classes, (size,), generator=gen)


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work: CUDA runs asynchronously, so time only after this."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_median(
    fns: dict[str, Callable[[], None]], rounds: int, device: str | torch.device = "cpu"
) -> dict[str, float]:
    """Median seconds per call, calling the functions in turn so that drift hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(rounds):
        for key, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}
