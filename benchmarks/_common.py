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


def _timm(name: str, image: int) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, img_size=image)


# Transformers, built for the benchmark's image size (timm: the position embedding sized to the
# input; torchvision's Swin pads its windows, so any size >= 32 runs). Random weights, 1000 classes.
TRANSFORMERS: dict[str, Callable[[int], nn.Module]] = {
    "swin_t": lambda image: torchvision.models.swin_t(),
    "vit_small": lambda image: _timm("vit_small_patch16_224", image),
    "vit_tiny": lambda image: _timm("vit_tiny_patch16_224", image),
}


def build(name: str, image: int) -> nn.Module:
    """A random-weight network of :data:`MODELS` or :data:`TRANSFORMERS` for ``image`` px."""
    if name in TRANSFORMERS:
        return TRANSFORMERS[name](image)
    if name in MODELS:
        return MODELS[name]()
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join([*MODELS, *TRANSFORMERS])}")


def source_and_model(
    name: str, num_classes: int = 10, image: int = 224
) -> tuple[nn.Module, nn.Module]:
    """A random-weight source (ImageNet head) and its copy with a new head."""
    torch.manual_seed(0)
    source = build(name, image).eval()
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
