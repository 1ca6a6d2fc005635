"""Question 3: peak memory of a `delta` training run relative to plain `l2`.

Each method runs in its own fresh process (peak RSS cannot be reset within one), a few SGD steps
on synthetic data; on CUDA `torch.cuda.max_memory_allocated` is used instead. Printed: the peak,
the growth over the process's footprint after `import torch` and model construction's baseline,
and both ratios to `l2`. Target (DESIGN.md section 3): delta / l2 <= 1.3.

    python benchmarks/peak_memory.py --batch 32 --image 112 --steps 3
    python -m benchmarks.peak_memory --models vit_small --batch 8 --image 224 --steps 3

``--models`` takes the names of ``benchmarks._common.MODELS`` and ``TRANSFORMERS``.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys

import torch

METHODS = ["l2", "l2sp", "fm", "delta"]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child(
    model_name: str, method: str, batch_size: int, image: int, steps: int, device: str
) -> None:
    from benchmarks._common import batch, source_and_model
    from deltaft import TransferObjective

    base = _rss_mib()
    source, model = source_and_model(model_name, image=image)
    x, y = (t.to(device) for t in batch(batch_size, image))
    kwargs = {"attention": "uniform"} if method == "delta" else {}
    objective = TransferObjective(copy.deepcopy(model), source, method, input_size=image, **kwargs)
    del source, model
    objective.to(device).train()
    optimizer = torch.optim.SGD(objective.param_groups(lr=1e-4), lr=1e-4, momentum=0.9)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        out = objective(x, y)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        del out
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _rss_mib()
    print(json.dumps({"peak": peak, "base": 0.0 if device == "cuda" else base}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenet_v2,resnet50")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image", type=int, default=112)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "METHOD"))
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.batch, args.image, args.steps, args.device)
        return
    unit = "MiB allocated (CUDA)" if args.device == "cuda" else "MiB peak RSS"
    for name in args.models.split(","):
        results = {}
        for method in METHODS:
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.peak_memory",
                "--child",
                name,
                method,
                "--batch",
                str(args.batch),
                "--image",
                str(args.image),
                "--steps",
                str(args.steps),
                "--device",
                args.device,
            ]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[method] = json.loads(line.strip().splitlines()[-1])
        l2 = results["l2"]
        print(f"\n{name}, batch {args.batch}, {args.image}x{args.image}, {args.device}")
        print(f"| method | {unit} | ratio to l2 | growth over baseline | growth ratio |")
        print("|---|---|---|---|---|")
        for method, r in results.items():
            growth, l2_growth = r["peak"] - r["base"], l2["peak"] - l2["base"]
            print(
                f"| {method} | {r['peak']:.0f} | {r['peak'] / l2['peak']:.2f} | "
                f"{growth:.0f} | {growth / l2_growth:.2f} |"
            )


if __name__ == "__main__":
    main()
