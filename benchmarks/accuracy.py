"""Question 4: accuracy of every method on the demo protocol at 10, 20 and 50 images per class.

ImageNet MobileNetV2 -> MNIST-5k (the demo's fixed 3000/2000 pool/test split and its settings,
configs/demo.yaml), 3 seeds, methods l2, l2sp, fm, delta, cotuning, lwf, spd (each at its authors'
defaults: `--cotuning-trade-off`, `--lwf-trade-off`, `--spd-lambda` of `deltaft train`) and scratch
(l2 from random weights), and the recipes of issue 13: delta+bss, l2+lpft+wise and delta+lpft+wise.
A +wise run chooses its mixing weight on validation, which the demo protocol has not: those two run
as their own comparison that draws n / 0.8 images a class and holds 20 % of them out
(``val_split`` 0.2), so they train on the same number of images as the other rows (not the same
images).
`compare` shares one alpha across methods; `fm` (reference scaling: no 1/(H*W), no C*w) needs a
far smaller one, so it runs as its own comparison with `--fm-alpha`. Prints one markdown table per
training-set size and writes OUT/accuracy.md, OUT/accuracy.json and OUT/accuracy.png.
Finished runs are reused (as `deltaft compare` does), so an interrupted benchmark continues.

    python benchmarks/accuracy.py --per-class 10,20,50 --seeds 3 --out runs/bench-accuracy
    python benchmarks/accuracy.py --jobs 2 --out runs/bench-accuracy  # 2 CPU cores, ~22 min

Several processes may fill in one OUT at once (say one per size and seed, on a GPU); a last run
over all of them then only reads the finished runs and writes the tables and the plot.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

import torch

from deltaft.app.compare import CompareResult, parse_seeds
from deltaft.app.demo import run_demo
from deltaft.cli.options import argparse_type

METHODS = ["l2", "l2sp", "delta", "delta+bss", "cotuning", "lwf", "spd", "scratch"]
#: Recipes that need a validation split (see the module docstring).
WISE_METHODS = ["l2+lpft+wise", "delta+lpft+wise"]
WISE_VAL_SPLIT = 0.2


def _drawn_with_validation(per_class: int) -> int:
    """The images a class to draw so that ``per_class`` remain for training once
    ``round(WISE_VAL_SPLIT * n)`` (at least 1) are held out, as the data's stratified split
    does."""
    n = per_class + 1
    while n - min(max(round(WISE_VAL_SPLIT * n), 1), n - 1) != per_class:
        n += 1
    return n


def _sizes(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def measure(
    per_class: int, seeds: list[int], out: Path, fm_alpha: float, cache_dir: str, jobs: int = 1
) -> CompareResult:
    """One comparison of every method (fm with its own alpha) at ``per_class`` images a class."""
    folder = out / f"per-class-{per_class}"
    main = run_demo(
        folder,
        seeds=seeds,
        methods=METHODS,
        cache_dir=cache_dir,
        overrides={"per_class": per_class},
        jobs=jobs,
    )
    fm = run_demo(
        folder / "fm",
        seeds=seeds,
        methods=["fm"],
        cache_dir=cache_dir,
        overrides={"per_class": per_class, "alpha": fm_alpha},
        jobs=jobs,
    )
    wise = run_demo(
        folder / "wise",
        seeds=seeds,
        methods=WISE_METHODS,
        cache_dir=cache_dir,
        overrides={"per_class": _drawn_with_validation(per_class), "val_split": WISE_VAL_SPLIT},
        jobs=jobs,
    )
    # l2, l2sp, fm, delta, delta+bss, cotuning, lwf, spd, l2+lpft+wise, delta+lpft+wise, scratch
    rows = [*main.rows[:2], *fm.rows, *main.rows[2:7], *wise.rows, *main.rows[7:]]
    result = CompareResult(rows=rows, seeds=main.seeds, out=folder)
    result.write()
    return result


def plot(table: dict[str, dict[str, Any]], path: Path) -> None:
    """Accuracy against training-set size from ``accuracy.json``'s content (``{size: compare}``).

    Left: every method; right: the pre-trained methods alone, whose differences the scratch
    baseline's range would flatten.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'deltaft[plots]')")
        return
    sizes = sorted(table, key=int)
    methods = [row["method"] for row in table[sizes[0]]["rows"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, shown in zip(axes, (methods, [m for m in methods if m != "scratch"]), strict=True):
        for index, method in enumerate(shown):
            rows = [next(r for r in table[n]["rows"] if r["method"] == method) for n in sizes]
            ax.errorbar(
                [int(n) * (1 + 0.015 * (index - 2)) for n in sizes],  # offsets keep bars apart
                [r["accuracy_mean"] for r in rows],
                yerr=[r["accuracy_std"] for r in rows],
                marker="o",
                capsize=3,
                label=method,
                color=f"C{methods.index(method)}",
            )
        ax.set(xscale="log", xlabel="training images per class", ylabel="test accuracy (%)")
        ax.set_xticks([int(n) for n in sizes], sizes)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.legend()
    axes[0].set_title("all methods")
    axes[1].set_title("pre-trained methods")
    seeds = ", ".join(str(seed) for seed in table[sizes[0]]["seeds"])
    fig.suptitle(f"ImageNet MobileNetV2 -> MNIST-5k: mean ± std over seeds {seeds}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=_sizes, default=[10, 20, 50])
    parser.add_argument(
        "--seeds",
        type=argparse_type(parse_seeds),
        default=[0, 1, 2],
        help="a count N (seeds 0..N-1) or a comma list; finished runs of other seeds are reused",
    )
    parser.add_argument("--fm-alpha", type=float, default=0.0003)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-accuracy"))
    parser.add_argument("--cache-dir", default="~/.cache/deltaft")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (the demo's --jobs)")
    parser.add_argument(
        "--replot",
        type=Path,
        metavar="JSON",
        help="only draw OUT/accuracy.png again from a saved accuracy.json; train nothing",
    )
    args = parser.parse_args()
    if args.replot:
        args.out.mkdir(parents=True, exist_ok=True)
        table = json.loads(args.replot.read_text())
        plot(table, args.out / "accuracy.png")
        return

    print(
        f"machine: {platform.processor() or platform.machine()}, torch threads "
        f"{torch.get_num_threads()}, torch {torch.__version__}"
    )
    results: dict[int, CompareResult] = {}
    for per_class in args.per_class:
        results[per_class] = measure(
            per_class, args.seeds, args.out, args.fm_alpha, args.cache_dir, args.jobs
        )
        print(f"\n## {per_class} training images per class\n")
        print(results[per_class].table_markdown())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "accuracy.md").write_text(
        "\n".join(
            f"## {n} training images per class\n\n{r.table_markdown()}" for n, r in results.items()
        )
    )
    table = {str(n): r.to_dict() for n, r in results.items()}
    (args.out / "accuracy.json").write_text(json.dumps(table, indent=2) + "\n")
    plot(table, args.out / "accuracy.png")
    print(f"wrote {args.out / 'accuracy.md'}, accuracy.json, accuracy.png")


if __name__ == "__main__":
    main()
