"""``deltaft layers``: a model's modules with output shapes; the default layers marked."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``layers`` to ``subparsers`` (``add_subparsers()``'s result)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "layers",
        help="list a model's modules with output shapes; mark the default layers",
        description="Run one forward pass and list every module with its output shape; "
        "'*' marks the layers fm/delta regularize by default.",
    )
    parser.add_argument("--model", required=True, metavar="NAME")
    parser.add_argument("--weights", default="none", help="weights to load (default: none)")
    parser.add_argument("--image-size", type=int, dest="image_size", help="default: the model's")
    parser.add_argument(
        "--head",
        metavar="NAME",
        help="dotted name of the classifier head, as train takes it (default: found; the listing "
        "needs none)",
    )
    parser.add_argument("--all", action="store_true", help="also modules without a tensor output")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Print the table of modules and the default layers."""
    from deltaft.app.backbone_checks import check_input_size, head_as_setting
    from deltaft.app.models import build_model
    from deltaft.heads import check_head
    from deltaft.layers import default_layers, describe_layers

    with head_as_setting():
        model, info = build_model(args.model, weights=args.weights, head=args.head)
        check_head(model, info.head)  # as train would refuse it, before anything is listed
    size = args.image_size or info.input_size
    check_input_size(model, size, name=args.model, native=info.input_size)
    defaults = set(default_layers(model, input_size=size))
    rows = [i for i in describe_layers(model, input_size=size) if args.all or i.shape is not None]
    width = max([len(i.name) for i in rows] + [4])
    kind_width = max([len(i.kind) for i in rows] + [4])
    print(f"  {'name':<{width}}  {'kind':<{kind_width}}  output (C, H, W) for one image")
    for i in rows:
        mark = "*" if i.name in defaults else " "
        shape = "-" if i.shape is None else "x".join(str(s) for s in i.shape[1:])
        print(f"{mark} {i.name:<{width}}  {i.kind:<{kind_width}}  {shape}")
    chosen = ",".join(default_layers(model, input_size=size))
    print(f"  head (train replaces it for the target classes; override with --head): {info.head}")
    print(f"* default layers of fm/delta at {size}x{size} (override with --layers): {chosen}")
    return 0
