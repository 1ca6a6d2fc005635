"""Question 1: how much does each regularizer add to a training step, relative to plain `l2`?

Prints, per model, the median time of one SGD step (forward, backward, update) for every method,
measured interleaved in one process, and its ratio to `l2`. `delta (straightforward)` runs the
whole frozen source as it is; `delta` folds its BatchNorm into the convolutions and stops it after
the last regularized layer. Target (DESIGN.md section 3): delta / l2 <= 1.25. `l2sp (unfused)` is
the per-parameter L2-SP graph that the fused `l2sp_penalty` replaced, kept here for comparison.

    python benchmarks/step_overhead.py --batch 32 --image 112 --rounds 10
    python -m benchmarks.step_overhead --models vit_small --batch 8 --image 224 --rounds 5

``--models`` takes the CNNs of ``benchmarks._common.MODELS`` and the transformers of
``TRANSFORMERS`` (``vit_small`` is timm's ViT-S/16 built for ``--image``); for a transformer the
source-layout variants (BatchNorm folding, oneDNN packing, channels-last) do not apply.
"""

from __future__ import annotations

import argparse
import copy
import platform
from collections.abc import Callable

import torch
from torch import Tensor

from benchmarks._common import MODELS, TRANSFORMERS, batch, interleaved_median, source_and_model
from deltaft import FrozenSource, TransferObjective, default_layers
from deltaft.regularizers import L2SPRegularizer

UNFUSED = "l2sp (unfused)"


def _unfused_l2sp_penalty(params: dict[str, Tensor], reference: dict[str, Tensor]) -> Tensor:
    """The previous ``l2sp_penalty``: sub, pow and sum per parameter tensor, then stack."""
    terms = [(params[n] - ref.detach()).pow(2).sum() for n, ref in reference.items()]
    return 0.5 * torch.stack(terms).sum()


class _UnfusedL2SP(L2SPRegularizer):
    def forward(self, params: dict[str, Tensor]) -> Tensor:
        return _unfused_l2sp_penalty(params, self.reference())


def _step_fn(objective: TransferObjective, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(objective.param_groups(lr=1e-4), lr=1e-4, momentum=0.9)
    objective.train()

    def step() -> None:
        out = objective(x, y)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()

    return step


def run(model_name: str, batch_size: int, image: int, rounds: int, device: str) -> None:
    source, model = source_and_model(model_name, image=image)
    x, y = (t.to(device) for t in batch(batch_size, image))
    # label -> (TransferObjective arguments, FrozenSource options or None for the defaults)
    delta: dict[str, object] = {"method": "delta", "attention": "uniform"}
    variants: dict[str, tuple[dict[str, object], dict[str, bool] | None]] = {
        "l2": ({"method": "l2"}, None),
        "l2sp": ({"method": "l2sp"}, None),
        UNFUSED: ({"method": "l2sp"}, None),
        "fm": ({"method": "fm"}, None),
        "delta": (delta, None),
        "delta+bss": ({**delta, "bss": 0.001, "bss_k": 1}, None),  # recipe +bss (issue 13)
        "delta (packed source, --source-mkldnn)": (delta, {"mkldnn": True}),
        "delta (source in input layout)": (delta, {"channels_last": False}),
        "delta (straightforward)": (
            delta,
            {"truncate": False, "fold_bn": False, "channels_last": False},
        ),
    }
    if model_name in TRANSFORMERS:  # no BatchNorm to fold, no convolution to pack or lay out
        for label in ("delta (packed source, --source-mkldnn)", "delta (source in input layout)"):
            del variants[label]
    layers = default_layers(model, input_size=image)
    fns = {}
    for label, (kwargs, source_options) in variants.items():
        frozen = (
            source if source_options is None else FrozenSource(source, layers, **source_options)
        )
        # Each variant trains its own copy so that no step sees another's updates.
        objective = TransferObjective(
            copy.deepcopy(model),
            frozen,
            input_size=image,
            **kwargs,  # type: ignore[arg-type]
        )
        if label == UNFUSED:
            reference = objective.terms["reg/l2sp"].reference()
            objective.terms["reg/l2sp"] = _UnfusedL2SP(reference)
        objective = objective.to(device)
        fns[label] = _step_fn(objective, x, y)
    medians = interleaved_median(fns, rounds, device)
    base = medians["l2"]
    print(f"\n{model_name}, batch {batch_size}, {image}x{image}, {device}, {rounds} rounds")
    print("| method | s / step (median) | ratio to l2 |")
    print("|---|---|---|")
    for label, seconds in medians.items():
        print(f"| {label} | {seconds:.3f} | {seconds / base:.2f} |")
    print(f"delta+bss / delta: {medians['delta+bss'] / medians['delta']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated names")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image", type=int, default=112)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads"
    )
    for name in args.models.split(","):
        run(name, args.batch, args.image, args.rounds, args.device)


if __name__ == "__main__":
    main()
