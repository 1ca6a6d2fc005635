"""Hugging Face image classifiers (``--model hf:NAME_OR_PATH``) through ``transformers``.

``transformers.AutoModelForImageClassification`` builds the model: ``from_pretrained`` for the
``imagenet`` weights (a local folder written by ``save_pretrained`` works offline; a hub name
needs the network or the Hugging Face cache), ``from_config`` with random weights for ``none``
and for a weights file, which is then loaded like any state dict. Needs
``pip install 'deltaft[hf]'``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

from deltaft.app.errors import SettingError, literal

__all__ = ["hf_meta", "hf_model"]

logger = logging.getLogger(__name__)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_DEFAULT_INPUT_SIZE = 224


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ValueError(
            "transformers is not installed; pip install 'deltaft[hf]' to use hf: models."
        ) from exc
    return transformers


def _looks_like_a_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def _load_error(name: str, what: str, exc: BaseException) -> SettingError:
    cause = " ".join(str(exc).split()) or type(exc).__name__
    return SettingError(
        f"could not load the Hugging Face {what} of hf:{literal(name)}: a hub name needs the "
        "network (or the Hugging Face cache); offline, pass the local folder that "
        f"save_pretrained wrote, or {{weights}} none with such a folder. Cause: {literal(cause)}"
    )


def hf_model(name: str, mode: str) -> nn.Module:
    """``AutoModelForImageClassification`` for ``name`` (a hub name or a local folder).

    ``mode``: ``"imagenet"`` loads the pretrained weights (``from_pretrained``); ``"none"`` and
    ``"path"`` build from the config with random weights (``from_config``; the caller loads a
    weights file).

    Raises:
        ValueError: transformers is not installed.
        SettingError: a folder that does not exist, or a hub name that cannot be fetched.
    """
    transformers = _import_transformers()
    folder = Path(name).expanduser()
    if _looks_like_a_path(name) and not folder.is_dir():
        raise SettingError(
            f"{{model}} hf:{literal(name)}: no such folder; pass a folder written by "
            "save_pretrained (config.json, model.safetensors) or a hub name."
        )
    source = str(folder) if folder.is_dir() else name
    auto = transformers.AutoModelForImageClassification
    if mode == "imagenet":
        try:
            model = auto.from_pretrained(source)
        except (OSError, ValueError) as exc:  # hub, HTTP and missing-file errors
            raise _load_error(name, "weights", exc) from exc
    else:
        try:
            config = transformers.AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise _load_error(name, "config", exc) from exc
        model = auto.from_config(config)
    model.config.return_dict = True  # logits as .logits, whatever the saved config says
    return model


def _size(value: Any) -> int | None:
    """A side from an image processor's ``crop_size`` / ``size`` (int or dict) or ``None``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, dict):
        for key in ("height", "shortest_edge", "width"):
            if isinstance(value.get(key), int):
                return int(value[key])
    return None


def hf_meta(name: str, model: nn.Module) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """``(input size, mean, std)``: from ``preprocessor_config.json`` of a local folder when it
    has one (``crop_size``, else ``size``; ``image_mean``, ``image_std``), else the model
    config's ``image_size`` (224 when it has none) with ImageNet's mean and std, said in a log
    line."""
    processor = Path(name).expanduser() / "preprocessor_config.json"
    if processor.is_file():
        values = json.loads(processor.read_text(encoding="utf-8"))
        size = _size(values.get("crop_size")) or _size(values.get("size"))
        mean, std = values.get("image_mean"), values.get("image_std")
        if size and isinstance(mean, list) and isinstance(std, list):
            return size, tuple(mean), tuple(std)
    config_size = getattr(getattr(model, "config", None), "image_size", None)
    size = _size(config_size) or _DEFAULT_INPUT_SIZE
    logger.info(
        "hf:%s has no image processor settings here; input %d (%s) with ImageNet mean/std.",
        name,
        size,
        "the model config's image_size" if _size(config_size) else "default",
    )
    return size, _IMAGENET_MEAN, _IMAGENET_STD
