"""Default layers of transformer families (internal to :mod:`deltaft.layers`): the residual
stream at a few depths, or the ends of stages."""

from __future__ import annotations

from typing import cast

from torch import nn

__all__ = ["hf_layers", "transformer_layers"]


def _evenly_spaced(prefix: str, count: int, depths: int = 4) -> list[str]:
    """``depths`` block names spread over ``count`` blocks, the last included (12: 2 5 8 11)."""
    depths = min(depths, count)  # fewer blocks than depths: every block (round(0.5) is 0)
    picks = sorted({round((i + 1) * count / depths) - 1 for i in range(depths)})
    return [f"{prefix}{i}" for i in picks]


def transformer_layers(model: nn.Module) -> list[str] | None:
    """The residual stream of a vision transformer at 4 depths, or Swin's stage ends.

    * timm ViT / DeiT / EVA / DINOv2 (``patch_embed`` and ``blocks``): ``blocks.N``.
    * torchvision ``vit_*``: ``encoder.layers.encoder_layer_N``.
    * torchvision ``swin_*``: the stage ``Sequential`` s of ``features`` (``features.1 .3 .5 .7``).
    """
    blocks = getattr(model, "blocks", None)
    kinds = (nn.Sequential, nn.ModuleList)
    flat = isinstance(blocks, kinds) and len(blocks) and not isinstance(blocks[0], kinds)
    if hasattr(model, "patch_embed") and flat:  # a flat list of blocks, not of stages
        return _evenly_spaced("blocks.", len(cast(nn.Module, blocks)._modules))
    encoder = getattr(model, "encoder", None)
    layers = getattr(encoder, "layers", None)
    if hasattr(model, "conv_proj") and isinstance(layers, nn.Sequential) and len(layers):
        names = [name for name, _ in layers.named_children()]
        prefix = names[0].rstrip("0123456789")
        if names == [f"{prefix}{i}" for i in range(len(names))]:
            return _evenly_spaced(f"encoder.layers.{prefix}", len(names))
    features = getattr(model, "features", None)
    if type(model).__name__.startswith("SwinTransformer") and isinstance(features, nn.Sequential):
        stages = [f"features.{n}" for n, m in features.named_children() if type(m) is nn.Sequential]
        return stages[1:] if len(stages) > 1 else None  # features.0 is the patch embedding
    return None


def hf_layers(model: nn.Module) -> list[str] | None:
    """Hugging Face models (``base_model_prefix``, e.g. ``vit``, ``resnet``, ``convnext``).

    * ViT-style: the residual stream after 4 evenly spaced blocks of ``<prefix>.encoder.layer``
      (transformers 4) or ``<prefix>.layers`` (transformers 5), whose blocks are ``...Layer``.
    * Swin-style (``<prefix>.encoder.layers`` of stages with ``blocks``: Swin, Swin V2...): the
      last block of each stage, before its patch merging, ``<prefix>.encoder.layers.N.blocks.M``
      (as torchvision's ``features.1 .3 .5 .7``).
    * Conv models: the end of each stage, ``<prefix>.encoder.stages.N``.
    """
    prefix = getattr(model, "base_model_prefix", None)
    if not isinstance(prefix, str) or not prefix or not hasattr(model, "config"):
        return None
    modules = dict(model.named_modules())
    for path in (f"{prefix}.encoder.layer", f"{prefix}.layers", f"{prefix}.encoder.layers"):
        blocks = modules.get(path)
        blocky = isinstance(blocks, nn.ModuleList) and len(blocks)
        if blocky and type(cast(nn.ModuleList, blocks)[0]).__name__.endswith("Layer"):
            return _evenly_spaced(f"{path}.", len(cast(nn.ModuleList, blocks)))
    stages = modules.get(f"{prefix}.encoder.layers")
    if isinstance(stages, nn.ModuleList) and len(stages):
        ends = [
            _last_block(f"{prefix}.encoder.layers.{i}", stage) for i, stage in enumerate(stages)
        ]
        if all(ends):
            return cast(list[str], ends)
    stages = modules.get(f"{prefix}.encoder.stages")
    if isinstance(stages, nn.ModuleList) and len(stages):
        return [f"{prefix}.encoder.stages.{i}" for i in range(len(stages))]
    return None


def _last_block(name: str, stage: nn.Module) -> str | None:
    """``name.blocks.<last>`` when ``stage`` holds a ``blocks`` list, else ``None``."""
    blocks = getattr(stage, "blocks", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks):
        return f"{name}.blocks.{len(blocks) - 1}"
    return None
