"""Question 4: accuracy of every method on the demo protocol at 10, 20 and 50 images per class.

ImageNet MobileNetV2 -> MNIST-5k (the demo's fixed 3000/2000 pool/test split and its settings,
configs/demo.yaml), 3 seeds, methods l2, l2sp, fm, delta and scratch (l2 from random weights).
`compare` shares one alpha across methods; `fm` (reference scaling: no 1/(H*W), no C*w) needs a
far smaller one, so it runs as its own comparison with `--fm-alpha`. Prints one markdown table per
training-set size and writes OUT/accuracy.md, OUT/accuracy.json and OUT/accuracy.png.
Finished runs are reused (as `deltaft compare` does), so an interrupted benchmark continues.

    python benchmarks/accuracy.py --per-class 10,20,50 --seeds 3 --out runs/bench-accuracy
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from deltaft.compare import CompareResult
from deltaft.demo import run_demo

METHODS = ["l2", "l2sp", "delta", "scratch"]


def _sizes(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def measure(
    per_class: int, seeds: int, out: Path, fm_alpha: float, cache_dir: str
) -> CompareResult:
    """One comparison of every method (fm with its own alpha) at ``per_class`` images a class."""
    folder = out / f"per-class-{per_class}"
    main = run_demo(
        folder,
        seeds=seeds,
        methods=METHODS,
        cache_dir=cache_dir,
        overrides={"per_class": per_class},
    )
    fm = run_demo(
        folder / "fm",
        seeds=seeds,
        methods=["fm"],
        cache_dir=cache_dir,
        overrides={"per_class": per_class, "alpha": fm_alpha},
    )
    rows = [*main.rows[:2], *fm.rows, *main.rows[2:]]  # l2, l2sp, fm, delta, scratch
    result = CompareResult(rows=rows, seeds=main.seeds, out=folder)
    result.write()
    return result


def _plot(results: dict[int, CompareResult], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = sorted(results)
    for index, method in enumerate(row.method for row in results[sizes[0]].rows):
        rows = [next(r for r in results[n].rows if r.method == method) for n in sizes]
        ax.errorbar(
            [n * (1 + 0.02 * (index - 2)) for n in sizes],  # small offsets keep bars apart
            [r.mean for r in rows],
            yerr=[r.std for r in rows],
            marker="o",
            capsize=3,
            label=method,
        )
    ax.set(xscale="log", xlabel="training images per class", ylabel="test accuracy (%)")
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_title("ImageNet MobileNetV2 -> MNIST-5k (mean ± std over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=_sizes, default=[10, 20, 50])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--fm-alpha", type=float, default=0.001)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-accuracy"))
    parser.add_argument("--cache-dir", default="~/.cache/deltaft")
    args = parser.parse_args()

    print(
        f"machine: {platform.processor() or platform.machine()}, torch threads "
        f"{torch.get_num_threads()}, torch {torch.__version__}"
    )
    results: dict[int, CompareResult] = {}
    for per_class in args.per_class:
        results[per_class] = measure(per_class, args.seeds, args.out, args.fm_alpha, args.cache_dir)
        print(f"\n## {per_class} training images per class\n")
        print(results[per_class].table_markdown())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "accuracy.md").write_text(
        "\n".join(
            f"## {n} training images per class\n\n{r.table_markdown()}" for n, r in results.items()
        )
    )
    (args.out / "accuracy.json").write_text(
        json.dumps({str(n): r.to_dict() for n, r in results.items()}, indent=2) + "\n"
    )
    _plot(results, args.out / "accuracy.png")
    print(f"wrote {args.out / 'accuracy.md'}, accuracy.json, accuracy.png")


if __name__ == "__main__":
    main()
