"""Feature-map layouts: where the channel axis of a layer's output is.

``"BCHW"``: ``(B, C, H, W)`` convolutional maps; ``"BHWC"``: ``(B, H, W, C)`` channels-last maps
(Swin, ConvNeXt blocks); ``"BNC"``: ``(B, N, C)`` token sequences (ViT, DeiT: the N tokens play the
role of the H x W positions). :func:`deltaft.layers.detect_layouts` finds a model's layouts from
dry forward passes; this module holds the names and the checks that need no model run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, cast

from torch import Tensor, nn

__all__ = [
    "HOW_TO_DECLARE",
    "LAYOUTS",
    "Layout",
    "PrefixTokens",
    "channel_axis",
    "check_declared",
    "declared_layout",
    "declared_prefix_tokens",
    "layout_from_two_sizes",
    "layout_of",
    "prefix_by_layer",
    "prefix_count",
]

Layout = Literal["BCHW", "BHWC", "BNC"]
#: Leading tokens of (B, N, C) maps to leave out: one count for every token layer, or by name.
PrefixTokens = int | Mapping[str, int]
LAYOUTS: tuple[str, ...] = ("BCHW", "BHWC", "BNC")
# Layouts: (B, C, H, W) convolutional maps, (B, H, W, C) channels-last maps (Swin, ConvNeXt
# blocks), (B, N, C) token sequences (ViT, DeiT: the N tokens play the role of the H x W positions)
_CHANNEL_AXIS = {"BCHW": 1, "BHWC": 3, "BNC": 2}
_RANK = {"BCHW": 4, "BHWC": 4, "BNC": 3}
HOW_TO_DECLARE = (
    "declare it: layouts={{{name!r}: 'BHWC'}} in the library (one of BCHW, BHWC, BNC), "
    "--layout on the command line"
)


def channel_axis(layout: Layout) -> int:
    """The channel axis of ``layout``: 1 for ``"BCHW"``, 3 for ``"BHWC"``, 2 for ``"BNC"``.

    Raises:
        ValueError: ``layout`` is not one of :data:`LAYOUTS`.
    """
    if layout not in _CHANNEL_AXIS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}.")
    return _CHANNEL_AXIS[layout]


def layout_of(
    name: str, shape: Sequence[int], layouts: Mapping[str, Layout] | Layout | None
) -> Layout:
    """The layout of layer ``name`` whose map has ``shape``, checked against its rank.

    ``layouts`` is one layout for every layer, a mapping by layer name, or ``None``: then the
    rank decides, ``"BCHW"`` for 4-D maps and ``"BNC"`` for 3-D maps (a channels-last map must be
    declared ``"BHWC"``, or found by :func:`detect_layouts`).

    Raises:
        ValueError: the layout is unknown, missing from the mapping, or of another rank than the
            map, or (``layouts=None``) the map is neither 3-D nor 4-D.
    """
    if layouts is None:
        if len(shape) not in (3, 4):
            raise ValueError(
                f"Layer {name!r}: expected a (B, C, H, W), (B, H, W, C) or (B, N, C) feature map, "
                f"got shape {tuple(shape)}; choose a module whose output has a channel axis."
            )
        return "BCHW" if len(shape) == 4 else "BNC"
    if isinstance(layouts, str):
        layout = layouts
    elif name in layouts:
        layout = layouts[name]
    else:
        raise ValueError(f"No layout for layer {name!r}; layouts cover {sorted(layouts)}.")
    channel_axis(layout)  # checks the name
    if len(shape) != _RANK[layout]:
        raise ValueError(
            f"Layer {name!r} is declared {layout} but its map has shape {tuple(shape)}; "
            f"a {layout} map is {_RANK[layout]}-D. Declare the layout that the module outputs."
        )
    return layout


def layout_from_two_sizes(first: tuple[int, ...], second: tuple[int, ...] | None) -> Layout | None:
    """The layout whose position axes change between two input sizes, or ``None`` if unclear."""
    if second is None or len(first) != len(second) or len(first) not in (3, 4):
        return None
    stays = {axis for axis in range(1, len(first)) if first[axis] == second[axis]}
    for layout, axis in _CHANNEL_AXIS.items():
        if _RANK[layout] == len(first) and stays == {axis}:
            return cast(Layout, layout)
    return None


def check_declared(
    name: str, layout: Layout, first: tuple[int, ...], second: tuple[int, ...] | None
) -> None:
    """Refuse a declared ``layout`` whose channel axis changes size with the input size.

    ``first`` and ``second`` are the layer's output shapes at an input size and at twice it
    (``second=None``: the model takes one size only, and the declaration is trusted). The channel
    axis keeps its size; an axis that scales with the image holds positions (rows, columns or
    tokens), and reading it as channels would weight positions. The rank is checked by
    :func:`layout_of`.

    Raises:
        ValueError: the declared channel axis changes size; the message names the layout the
            shapes show, when they show one.
    """
    axis = channel_axis(layout)
    if second is None or len(second) != len(first) or first[axis] == second[axis]:
        return
    seen = layout_from_two_sizes(first, second)
    hint = f"its map is {seen}; declare {seen}" if seen else "declare the layout it outputs"
    raise ValueError(
        f"Layer {name!r} is declared {layout}, but axis {axis} of its map changes with the input "
        f"size ({first}, then {second} at twice the size): it holds positions, not channels; "
        f"{hint} (layouts= in the library, --layout on the command line)."
    )


def declared_layout(model: nn.Module, shape: tuple[int, ...]) -> Layout | None:
    """The layout a fixed-size model declares: timm's ``output_fmt``, a transformer's width."""
    if len(shape) == 4:
        fmt = getattr(model, "output_fmt", None)
        fmt = getattr(fmt, "value", fmt)  # timm's Format enum or a plain string
        return {"NHWC": "BHWC", "NCHW": "BCHW"}.get(str(fmt))  # type: ignore[return-value]
    if len(shape) == 3:
        widths = {getattr(model, a, None) for a in ("embed_dim", "hidden_dim", "num_features")}
        config = getattr(model, "config", None)
        widths.add(getattr(config, "hidden_size", None))
        return "BNC" if shape[2] in widths else None
    return None


def prefix_count(
    name: str,
    layout: Layout,
    shape: Sequence[int],
    prefix_tokens: PrefixTokens,
    names: Sequence[str] = (),
) -> int:
    """How many leading tokens of layer ``name``'s map to leave out: ``P`` of ``prefix_tokens``.

    An ``int`` applies to every ``"BNC"`` layer and is ignored for ``(B, C, H, W)`` and
    ``(B, H, W, C)`` maps (they have no tokens); a mapping gives ``P`` by layer name (0 for the
    names it lacks) and may only name ``"BNC"`` layers.

    ``names``: every layer of the call, in order; with the first of them, a mapping that names
    another layer is refused (a misspelt name would silently keep its tokens).

    Raises:
        ValueError: ``P`` is not an integer ``>= 0``, names a layer that is not ``"BNC"`` or not
            in ``names``, or leaves no token of the ``N`` in ``shape``.
    """
    if isinstance(prefix_tokens, Mapping) and name == next(iter(names), None):
        unknown = sorted(set(prefix_tokens) - set(names))
        if unknown:
            raise ValueError(
                f"prefix_tokens names {unknown}, which are not regularized or scored layers; "
                f"the layers are {list(names)}."
            )
    count = prefix_tokens.get(name, 0) if isinstance(prefix_tokens, Mapping) else prefix_tokens
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"prefix_tokens must be integers >= 0; got {count!r} for {name!r}.")
    if layout != "BNC":
        if count and isinstance(prefix_tokens, Mapping):
            raise ValueError(
                f"prefix_tokens names layer {name!r}, whose map is {layout}, not (B, N, C) "
                "tokens; give prefix counts for token layers only."
            )
        return 0
    if count >= shape[1]:
        raise ValueError(
            f"Layer {name!r} has {shape[1]} tokens; leaving out {count} prefix tokens leaves "
            "none. Check prefix_tokens (the class, distillation and register tokens)."
        )
    return count


def declared_prefix_tokens(model: nn.Module) -> int | None:
    """How many prefix tokens (class, distillation, register) ``model`` declares, or ``None``.

    * an ``int`` attribute ``num_prefix_tokens`` (timm ViT/DeiT/EVA/DINOv2; set it on your own
      model to declare it);
    * torchvision ``VisionTransformer``: its ``class_token``, 1;
    * Hugging Face ViT-style models: the tokens of the ``cls_token``, ``distillation_token`` and
      ``register_tokens`` parameters of their ``embeddings`` (ViT 1, DeiT distilled 2, DINOv2
      with registers 1 + R).
    """
    count = getattr(model, "num_prefix_tokens", None)
    if isinstance(count, int) and not isinstance(count, bool):
        return count
    if type(model).__name__ == "VisionTransformer" and hasattr(model, "class_token"):
        return 1
    names = ("cls_token", "distillation_token", "register_tokens")
    for module_name, module in model.named_modules():
        if module_name.rpartition(".")[2] != "embeddings":
            continue
        tokens = [getattr(module, n) for n in names if isinstance(getattr(module, n, None), Tensor)]
        if tokens:
            return sum(int(t.shape[1]) for t in tokens)  # each (1, T, C)
    return None


def prefix_by_layer(prefix_tokens: PrefixTokens, layouts: Mapping[str, Layout]) -> dict[str, int]:
    """``{layer: P}`` for the ``"BNC"`` layers of ``layouts`` whose ``P`` is not 0: what
    ``prefix_tokens`` means for these layers, so that an ``int`` and a mapping can be compared."""
    counts = {
        name: prefix_tokens.get(name, 0) if isinstance(prefix_tokens, Mapping) else prefix_tokens
        for name, layout in layouts.items()
        if layout == "BNC"
    }
    return {name: count for name, count in counts.items() if count}
