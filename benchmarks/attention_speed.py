"""Question 2: exact channel-removal scores vs the reference per-channel loop, same inputs.

Prints per model the wall time of both methods, the speed-up and the max abs difference of the
scores and of the attention weights. Target (DESIGN.md section 3): >= 5x with max |dw| <= 1e-5.
The reference loop runs one forward per channel: keep images small and batches few.

    python -m benchmarks.attention_speed --image 64 --batch 16 --batches 1
    python -m benchmarks.attention_speed --models vit_tiny,swin_t --image 64 --batch 8

``vit_tiny`` is timm's ``vit_tiny_patch16_224`` built for ``--image`` (its position embedding
sized to the input), ``swin_t`` torchvision's (it pads its windows, so any size >= 32 runs).
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks._common import MODELS, batch, build, synchronize
from deltaft import default_layers
from deltaft.attention import attention_from_scores, channel_removal_scores


def run(name: str, image: int, batch_size: int, n_batches: int, device: str) -> None:
    torch.manual_seed(0)
    model = build(name, image)
    with torch.no_grad():  # settle BatchNorm statistics away from their initial values
        model.train()(batch(32, image)[0])
    model.eval().to(device)
    layers = default_layers(model)
    batches = [
        tuple(t.to(device) for t in batch(batch_size, image, num_classes=1000))
        for _ in range(n_batches)
    ]
    seconds, scores = {}, {}
    for method in ("exact", "reference"):
        synchronize(device)
        start = time.perf_counter()
        scores[method] = channel_removal_scores(
            model, batches, layers, n_batches=n_batches, method=method
        )
        synchronize(device)
        seconds[method] = time.perf_counter() - start
    weights = {m: attention_from_scores(s) for m, s in scores.items()}
    d_scores = max((scores["exact"][k] - scores["reference"][k]).abs().max().item() for k in layers)
    d_w = max((weights["exact"][k] - weights["reference"][k]).abs().max().item() for k in layers)
    channels = sum(s.numel() for s in scores["exact"].values())
    # float32 round-off of the loss is ~1e-7: when the scores' spread is near that (random
    # weights, tiny images), z-scoring amplifies it and dw says nothing about exactness.
    spread = min(s.std(correction=0).item() for s in scores["reference"].values())
    print(
        f"| {name} | {channels} | {seconds['reference']:.1f} | {seconds['exact']:.1f} | "
        f"{seconds['reference'] / seconds['exact']:.2f}x | {d_scores:.1e} | {d_w:.1e} | "
        f"{spread:.1e} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--image", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.image} px, "
        f"{args.batches} batch(es) of {args.batch}, {args.device}"
    )
    print("| model | channels | reference s | exact s | speed-up | max dscore | max dw | min std |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        run(name, args.image, args.batch, args.batches, args.device)


if __name__ == "__main__":
    main()
