"""The settings of one fine-tuning run: a typed dataclass, YAML in and out, unknown keys are errors.

Precedence, lowest first: the dataclass defaults, a YAML file (``--config``), then command-line
flags. The resolved configuration is written to ``RUN_DIR/config.yaml`` and can be passed back with
``--config`` to repeat a run.

Example:
    >>> cfg = TrainConfig.from_sources({"alpha": 0.1}, {"data": "imgs", "model": "resnet50",
    ...                                                  "out": "runs/a"})
    >>> cfg.alpha, cfg.epochs
    (0.1, 10)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_type_hints

import torch
import yaml

from deltaft.app.checks import above, at_least, exclusive, in_range, layout_setting
from deltaft.app.config_io import coerce, normalise_keys, read_settings_file
from deltaft.app.data import (
    Preset,
    check_crop_scale,
    check_hflip,
    check_image_size,
    check_sampling,
    check_val_split,
)
from deltaft.app.errors import SettingError, literal
from deltaft.app.methods import MethodSpec, spec_help
from deltaft.attention import BatchNormMode
from deltaft.attention import Method as AttentionMethod
from deltaft.engine import Amp
from deltaft.regularizers.functional import Reduction

__all__ = [
    "DEFAULT_EPOCHS",
    "DEFAULT_WISE_ALPHAS",
    "EXCLUSIVE",
    "REQUIRED",
    "RUNTIME_KEYS",
    "TrainConfig",
    "load_config",
]

Optimizer = Literal["sgd", "adamw"]
Schedule = Literal["step", "exponential", "cosine"]
SourceBN = Literal["running", "batch"]
Relationship = Literal["reverse", "direct"]

DEFAULT_EPOCHS = 10
#: WiSE-FT's mixing weights by default: the ends and three points between them.
DEFAULT_WISE_ALPHAS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
# Pairs of settings of which a run takes one at most; a later source that sets one drops the other.
EXCLUSIVE: tuple[tuple[str, str], ...] = (("epochs", "iterations"), ("per_class", "fraction"))


def _meta(help: str, *, metavar: str | None = None, runtime: bool = False) -> dict[str, Any]:
    """A field's metadata: its help text, its command-line metavar, whether it is a runtime key.

    ``help`` is a template: ``{name}`` names another setting (the command line writes ``--name``)
    and ``{default}`` the field's default; without ``(default`` in it and with a default that is
    neither ``None`` nor a bool, the command line appends ``(default: X)``. ``runtime`` marks
    settings that change how a run executes but not what it computes (up to float round-off):
    they may differ between a run and its resume (:data:`RUNTIME_KEYS`).
    """
    return {"help": help, "metavar": metavar, "runtime": runtime}


_MAX_SEED = 2**63 - 1  # torch seeds are 64-bit; DistributedSampler adds the epoch to the seed


@dataclass
class TrainConfig:
    """Every setting of ``deltaft train``; each field is the flag of the same name.

    Validated on construction (:class:`~deltaft.app.errors.SettingError` names the setting and
    the fix). Each field's ``metadata`` holds its command-line help and metavar.
    Values are coerced where YAML is ambiguous: ``"1e-4"`` (a string to YAML) becomes a float,
    ``"a,b"`` a list of layers.

    Attributes:
        data: image folder (``DIR/train/<class>/*`` or ``DIR/<class>/*``) or ``tv:NAME``.
        model: torchvision or timm name, or ``pkg.module:factory``.
        out: the run directory.
        weights: ``imagenet``, ``none`` (random source, for tests) or a weight file.
        method: a method spec (:mod:`deltaft.app.methods`): a base method (``l2``, ``l2sp``,
            ``fm``, ``delta``, ...) and recipes after ``+`` (``delta+lpft+wise``); stored in
            canonical order.
        alpha: strength of the behavioural term (``fm``, ``delta``) or of L2-SP.
        beta: strength of ``1/2 ||head||^2`` (all methods but ``l2``).
        lr: learning rate of the backbone (and of the head unless ``head_lr`` is set).
        head_lr: learning rate of the new head; ``None`` means ``lr``.
        momentum: SGD momentum (ignored by AdamW).
        optimizer: ``sgd`` or ``adamw``.
        weight_decay: the weight decay of ``l2``, ``cotuning`` and ``lwf`` (as their authors');
            the other methods use none.
        batch_size: images per step (per process under ``torchrun``).
        epochs: passes over the training set; exclusive with ``iterations``; 10 when neither.
        iterations: optimizer steps in total; the last epoch stops early.
        schedule: ``step`` (lr x ``lr_gamma`` once, at ``step_at`` of training), ``exponential``
            (``lr * lr_gamma ** (t / T)``, reaching ``lr * lr_gamma`` at the end) or ``cosine``
            (to 0); the lr is updated after every step.
        step_at: fraction of the steps after which ``step`` multiplies the lr by ``lr_gamma``.
        lr_gamma: the decay factor of ``step`` and ``exponential``.
        image_size: training resolution; ``None`` is the model's pretrained size.
        preset: data transforms: ``default`` (the model's pretrained config) or ``paper``
            (``Resize((256, 256)) + RandomCrop(224) + flip``, as the reference code).
        hflip: probability of the training transform's horizontal flip; 0 turns it off (for
            digits or text, whose mirror image is another thing).
        crop_scale: smallest area fraction the ``default`` preset's ``RandomResizedCrop``
            keeps; ``None`` is 0.25. The ``paper`` preset has no such crop.
        per_class: keep N training images per class (stratified, seeded).
        fraction: keep this fraction of each class's training images (exclusive with
            ``per_class``).
        val_split: fraction of the training images held out for validation when the data has no
            ``val`` split; 0 means no validation (``best.pt`` is then the last epoch).
        layers: regularized layers of ``fm``/``delta``; ``None`` is the default rule.
        attention: a saved attention file to reuse instead of estimating one (``delta``).
        attention_epochs: epochs of the attention head's training.
        attention_batches: batches the channel-removal scores average over.
        attention_method: ``exact`` (fast, same result), ``reference`` (per-channel loop) or
            ``taylor`` (first-order approximation).
        temperature: softmax temperature of the attention.
        bn: BatchNorm during the attention head's training: ``adapt`` (reference) or ``frozen``.
        reduction: the feature-map penalty's batch reduction: ``sum`` (reference) or ``mean``.
        source_bn: the frozen source's BatchNorm while training: ``running`` statistics
            (reference) or the current ``batch``'s (removes the step-0 mismatch with the target).
        source_mkldnn: on the CPU, run the frozen source as a oneDNN copy with packed weights:
            faster steps on ResNets, more memory; the same maps up to round-off.
        head: dotted name of the classifier head; found automatically when ``None``.
        seed: seeds Python, NumPy and torch, the subsampling and the data order.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
        amp: mixed precision on CUDA: ``none``, ``bf16`` or ``fp16`` (with loss scaling).
        channels_last: NHWC memory format on GPU.
        workers: DataLoader worker processes.
        resume: continue the run in ``out`` from ``checkpoints/last.pt``.
        download: let torchvision datasets (``tv:NAME``) download.
        data_root: where ``tv:NAME`` datasets live.
        cotuning_trade_off: weight of the Co-Tuning loss of the kept source head.
        cotuning_relationship: Co-Tuning's category-relationship estimator, ``reverse`` or
            ``direct`` (:func:`~deltaft.cotuning.estimate_relationship`).
        lwf_trade_off: weight of LwF's distillation penalty (which has the ``T^2`` factor).
        lwf_temperature: LwF's distillation temperature ``T``.
        spd_lambda: strength of SPD's selective projection (the optimizer's ``weight_decay``).
        layout: the layout of the regularized layers' maps: ``auto`` (detected by
            :func:`~deltaft.layers.check_layers`), ``BCHW``, ``BHWC`` or ``BNC`` for all of them,
            or ``LAYER=LAYOUT`` pairs (``blocks.3=BNC,stem=BCHW``, the others detected); declared
            layouts are checked against the same dry forwards; decided once per run for the
            objective and the attention (:func:`~deltaft.app.checks.layout_setting`).
        exclude_prefix_tokens: leave the first tokens of ``(B, N, C)`` maps (class,
            distillation, register tokens) out of the penalty and the attention scores; their
            count is the model's declaration (:func:`deltaft.app.models.prefix_token_count`).
        bss_eta: ``+bss``: the strength ``eta`` of Batch Spectral Shrinkage (0.001, as the
            authors' code).
        bss_k: ``+bss``: how many of the smallest singular values are shrunk (1).
        lp_epochs: ``+lpft`` / ``+wise``: epochs of the linear probe (the new head trained on
            the frozen backbone); 10, as DELTA's attention head.
        lp_lr: ``+lpft`` / ``+wise``: the linear probe's learning rate (0.01).
        wise_alphas: ``+wise``: the mixing weights ``a`` of ``(1 - a) * theta_0 + a * theta_ft``;
            the one of best validation accuracy is kept.
        wise_bn_batches: ``+wise``: training batches that re-estimate the BatchNorm statistics
            of each interpolated network.
    """

    data: str = field(
        metadata=_meta(
            "image folder (DIR/train/<class>/*, optional DIR/val, DIR/test; or DIR/<class>/*) "
            "or tv:NAME (a torchvision dataset, e.g. tv:Flowers102)",
            metavar="DIR",
        )
    )
    model: str = field(
        metadata=_meta("torchvision or timm model name, or pkg.module:factory", metavar="NAME")
    )
    out: str = field(
        metadata=_meta(
            "run directory (must be new unless {resume})", metavar="RUN_DIR", runtime=True
        )
    )
    weights: str = field(
        default="imagenet",
        metadata=_meta(
            "source weights: imagenet, none (random) or a weight file",
            metavar="{imagenet,none,PATH}",
        ),
    )
    method: str = field(default="delta", metadata=_meta(f"method: {spec_help()}", metavar="SPEC"))
    alpha: float = field(default=0.01, metadata=_meta("strength of the feature-map / L2-SP term"))
    beta: float = field(default=0.01, metadata=_meta("strength of the new head's L2 term"))
    lr: float = field(default=0.01, metadata=_meta("learning rate"))
    head_lr: float | None = field(
        default=None, metadata=_meta("learning rate of the new head (default: {lr})")
    )
    momentum: float = field(default=0.9, metadata=_meta("SGD momentum"))
    optimizer: Optimizer = field(default="sgd", metadata=_meta("optimizer"))
    weight_decay: float = field(
        default=1e-4, metadata=_meta("weight decay of methods l2, cotuning and lwf")
    )
    batch_size: int = field(default=32, metadata=_meta("images per step, per process"))
    epochs: int | None = field(default=None, metadata=_meta(f"epochs (default: {DEFAULT_EPOCHS})"))
    iterations: int | None = field(
        default=None, metadata=_meta("optimizer steps in total, instead of {epochs}")
    )
    schedule: Schedule = field(
        default="step",
        metadata=_meta("per-step lr schedule (default: {default}, x lr-gamma at {step_at})"),
    )
    step_at: float = field(
        default=2 / 3, metadata=_meta("fraction of training where 'step' decays (default 2/3)")
    )
    lr_gamma: float = field(default=0.1, metadata=_meta("lr decay factor of step/exponential"))
    image_size: int | None = field(
        default=None, metadata=_meta("image side in pixels (default: the model's)")
    )
    preset: Preset = field(
        default="default",
        metadata=_meta("transforms: the model's pretrained config, or the paper's protocol"),
    )
    hflip: float = field(
        default=0.5,
        metadata=_meta(
            "probability of the training flip (default: {default}; 0 for digits or text)",
            metavar="P",
        ),
    )
    crop_scale: float | None = field(
        default=None,
        metadata=_meta(
            "smallest area share of the default preset's random crop (default: 0.25)",
            metavar="S",
        ),
    )
    per_class: int | None = field(
        default=None, metadata=_meta("keep N training images per class", metavar="N")
    )
    fraction: float | None = field(
        default=None, metadata=_meta("keep this fraction of each class", metavar="F")
    )
    val_split: float = field(
        default=0.0,
        metadata=_meta(
            "hold out this fraction of the training set for validation (default: {default}, or "
            "the data's val/ folder)",
            metavar="F",
        ),
    )
    layers: list[str] | None = field(
        default=None,
        metadata=_meta(
            "regularized layers (default: last block of each stage; see `deltaft layers`)",
            metavar="A,B,C",
        ),
    )
    attention: str | None = field(
        default=None, metadata=_meta("reuse a saved attention file (method delta)", metavar="FILE")
    )
    attention_epochs: int = field(default=10, metadata=_meta("epochs of the attention head"))
    attention_batches: int = field(default=4, metadata=_meta("batches the attention scores use"))
    attention_method: AttentionMethod = field(
        default="exact",
        metadata=_meta("channel scoring: exact, reference loop, or taylor (approximate)"),
    )
    temperature: float = field(default=5.0, metadata=_meta("attention softmax temperature"))
    bn: BatchNormMode = field(
        default="adapt", metadata=_meta("BatchNorm while training the attention head")
    )
    reduction: Reduction = field(
        default="sum",
        metadata=_meta(
            "batch reduction of the feature-map penalty (default: {default}, as the paper)"
        ),
    )
    source_bn: SourceBN = field(
        default="running",
        metadata=_meta("frozen source's BatchNorm while training: running (paper) or batch stats"),
    )
    source_mkldnn: bool = field(
        default=False,
        metadata=_meta(
            "CPU: run the frozen source with oneDNN-packed weights (faster ResNet steps, more "
            "memory; default: off)",
            runtime=True,
        ),
    )
    head: str | None = field(
        default=None,
        metadata=_meta("dotted name of the classifier head (default: found)", metavar="NAME"),
    )
    seed: int = field(default=0, metadata=_meta("random seed"))
    device: str = field(
        default="auto", metadata=_meta("auto, cpu, cuda, cuda:N or mps", runtime=True)
    )
    amp: Amp = field(default="none", metadata=_meta("mixed precision on CUDA", runtime=True))
    channels_last: bool = field(
        default=False, metadata=_meta("NHWC memory format on CUDA", runtime=True)
    )
    workers: int = field(default=2, metadata=_meta("DataLoader worker processes", runtime=True))
    resume: bool = field(
        default=False,
        metadata=_meta("continue the run in {out} from its last checkpoint", runtime=True),
    )
    download: bool = field(
        default=False, metadata=_meta("let tv:NAME datasets download", runtime=True)
    )
    data_root: str | None = field(
        default=None,
        metadata=_meta("where tv:NAME datasets live", metavar="DIR", runtime=True),
    )
    # -- base methods that keep the source head or anchor in the optimizer (cotuning, lwf, spd)
    cotuning_trade_off: float = field(
        default=2.3,
        metadata=_meta(
            "weight of Co-Tuning's loss on the kept source head (default: {default}, "
            "thuml/CoTuning train.py)"
        ),
    )
    cotuning_relationship: Relationship = field(
        default="reverse",
        metadata=_meta(
            "Co-Tuning's relationship estimator: reverse (thuml/CoTuning's default; fitted on "
            "the validation split, else on a held-out fifth of the training images) or direct"
        ),
    )
    lwf_trade_off: float = field(
        default=4 / 9,
        metadata=_meta(
            "weight of LwF's distillation T^2*KL (default: 4/9 = the peer library's 4 at T=3, "
            "tllib lwf.py, whose KL lacks T^2)"
        ),
    )
    lwf_temperature: float = field(
        default=3.0, metadata=_meta("LwF's distillation temperature T (tllib lwf.py)")
    )
    spd_lambda: float = field(
        default=1.0,
        metadata=_meta(
            "SPD's projection strength (GT-RIPL AdamSPD's weight_decay; the authors' code sets "
            "none, 1 projects a step back to its previous distance)"
        ),
    )

    # -- feature-map layouts and prefix tokens (issue #11) ----------------------------------------
    layout: str = field(
        default="auto",
        metadata=_meta(
            "layout of the regularized layers' maps: auto (found by dry forwards at two input "
            "sizes), BCHW, BHWC (channels last) or BNC (tokens) for all of them, or by layer: "
            "blocks.3=BNC,stem=BCHW (the others found)",
            metavar="LAYOUT",
        ),
    )
    exclude_prefix_tokens: bool = field(
        default=False,
        metadata=_meta(
            "leave the class/distillation/register tokens of (B, N, C) maps out of the penalty "
            "and the attention scores; their count is the model's (default: included)"
        ),
    )

    # -- recipes of a method spec (+bss, +lpft, +wise) ------------------------------------------
    bss_eta: float = field(
        default=0.001,
        metadata=_meta(
            "+bss: strength eta of Batch Spectral Shrinkage (default: {default}, as the authors' "
            "code, thuml/Batch-Spectral-Shrinkage)"
        ),
    )
    bss_k: int = field(
        default=1,
        metadata=_meta(
            "+bss: how many of the smallest singular values it shrinks (default: {default}, as "
            "the authors' code)"
        ),
    )
    lp_epochs: int = field(
        default=10,
        metadata=_meta(
            "+lpft/+wise: epochs of the linear probe (new head, frozen backbone; Kumar et al., "
            "ICLR 2022) (default: {default}, as DELTA's attention head, which delta reuses)"
        ),
    )
    lp_lr: float = field(
        default=0.01,
        metadata=_meta(
            "+lpft/+wise: learning rate of the linear probe (default: {default}, as DELTA's "
            "attention head)"
        ),
    )
    wise_alphas: list[float] = field(
        default_factory=lambda: list(DEFAULT_WISE_ALPHAS),
        metadata=_meta(
            "+wise: mixing weights a of (1-a)*pretrained + a*fine-tuned, the best chosen on "
            "validation (Wortsman et al., CVPR 2022) (default: 0,0.25,0.5,0.75,1)",
            metavar="A,B,C",
        ),
    )
    wise_bn_batches: int = field(
        default=50,
        metadata=_meta(
            "+wise: training batches that re-estimate BatchNorm statistics for each mixing "
            "weight (default: {default})",
            metavar="N",
        ),
    )

    def __post_init__(self) -> None:
        """Coerce every value to its field's type, then check it.

        The checks of data and transform settings are the data functions' own
        (:func:`~deltaft.app.data.check_sampling`, :func:`~deltaft.app.data.check_val_split`,
        :func:`~deltaft.app.data.check_image_size`, :func:`~deltaft.app.data.check_hflip`,
        :func:`~deltaft.app.data.check_crop_scale`), so a value fails here exactly when it
        would fail there, with the same message.
        """
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce(f.name, getattr(self, f.name), hints[f.name]))
        for key in REQUIRED:
            if not getattr(self, key):
                raise SettingError(f"{{{key}}} must not be empty.")
        for one, other in EXCLUSIVE:
            exclusive(one, getattr(self, one), other, getattr(self, other))
        if self.epochs is None and self.iterations is None:
            self.epochs = DEFAULT_EPOCHS
        try:
            self.method = str(MethodSpec.parse(self.method))
        except ValueError as error:
            raise SettingError(f"{{method}}: {literal(error)}") from None
        self._check_optimisation()
        self._check_data()
        self._check_recipes()
        if self.layers is not None and (
            not self.layers or len(set(self.layers)) != len(self.layers)
        ):
            raise SettingError(
                f"{{layers}} must name distinct modules, got {literal(self.layers)}; e.g. "
                "{layers} layer1.2.conv3,layer2.3.conv3 (see `deltaft layers --model NAME`)."
            )
        layout_setting(self.layout)
        at_least("attention_epochs", self.attention_epochs, 0)
        at_least("attention_batches", self.attention_batches, 1)
        above("temperature", self.temperature, 0.0)
        if not 0 <= self.seed <= _MAX_SEED:
            raise SettingError(
                f"{{seed}} must be in [0, 2**63 - 1], got {self.seed}; any seed in that range "
                "gives a reproducible run."
            )
        at_least("workers", self.workers, 0)
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise SettingError(
                    f"{{device}} {literal(repr(self.device))} is not a device; use auto, cpu, "
                    "cuda, cuda:N or mps."
                ) from None

    def _check_optimisation(self) -> None:
        """Strengths, learning rates, batch size, training length and schedule."""
        at_least("alpha", self.alpha, 0.0)
        at_least("beta", self.beta, 0.0)
        at_least("weight_decay", self.weight_decay, 0.0)
        # -- cotuning, lwf, spd
        at_least("cotuning_trade_off", self.cotuning_trade_off, 0.0)
        at_least("lwf_trade_off", self.lwf_trade_off, 0.0)
        in_range(
            "lwf_temperature", self.lwf_temperature, 0.0, math.inf, left_open=True, right_open=True
        )
        at_least("spd_lambda", self.spd_lambda, 0.0)
        above("lr", self.lr, 0.0)
        if self.head_lr is not None:
            above("head_lr", self.head_lr, 0.0)
        in_range("momentum", self.momentum, 0.0, 1.0, right_open=True)
        at_least("batch_size", self.batch_size, 1)
        if self.epochs is not None:
            at_least("epochs", self.epochs, 1)
        if self.iterations is not None:
            at_least("iterations", self.iterations, 1)
        in_range("step_at", self.step_at, 0.0, 1.0, left_open=True, right_open=True)
        in_range("lr_gamma", self.lr_gamma, 0.0, 1.0, left_open=True)

    def _check_data(self) -> None:
        """Image size, subsampling, validation split and augmentation: the data's own checks."""
        if self.image_size is not None:
            check_image_size(self.image_size)
        check_sampling(self.per_class, self.fraction)
        check_val_split(self.val_split)
        check_hflip(self.hflip)
        check_crop_scale(self.crop_scale, self.preset)

    def _check_recipes(self) -> None:
        """The settings of the recipes (checked whether or not the spec uses them)."""
        at_least("bss_eta", self.bss_eta, 0.0)
        at_least("bss_k", self.bss_k, 1)
        at_least("lp_epochs", self.lp_epochs, 1)
        above("lp_lr", self.lp_lr, 0.0)
        at_least("wise_bn_batches", self.wise_bn_batches, 1)
        if not self.wise_alphas:
            raise SettingError("{wise_alphas} must name at least one mixing weight, e.g. 0,0.5,1.")
        for alpha in self.wise_alphas:
            in_range("wise_alphas", alpha, 0.0, 1.0)
        if len(set(self.wise_alphas)) != len(self.wise_alphas):
            raise SettingError(
                f"{{wise_alphas}} must be distinct, got {literal(self.wise_alphas)}; name each "
                "mixing weight once."
            )

    @property
    def spec(self) -> MethodSpec:
        """:attr:`method` parsed: the base method and its recipes."""
        return MethodSpec.parse(self.method)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        """Every setting's name, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_sources(
        cls,
        *sources: Mapping[str, Any] | None,
        origin: str = "the configuration",
    ) -> TrainConfig:
        """Merge mappings, later ones winning, and build a validated config.

        Typically ``from_sources(load_config(path), cli_overrides)``. ``epochs`` and
        ``iterations`` replace each other: a later source that sets one drops the other set by
        an earlier source, so ``--iterations`` overrides a file's ``epochs``. ``None`` values
        mean "not given" (they do not reset a setting).

        Raises:
            ValueError: an unknown key (the valid ones are listed), a missing required setting or
                an invalid value.
        """
        merged: dict[str, Any] = {}
        for source in sources:
            if not source:
                continue
            values = _normalise_keys(source, origin)
            given = {k: v for k, v in values.items() if v is not None}
            for pair in EXCLUSIVE:
                for key, other in (pair, pair[::-1]):
                    if key in given and other not in given:
                        merged.pop(other, None)
            merged.update(given)
        missing = [f"{{{k}}}" for k in REQUIRED if merged.get(k) in (None, "")]
        if missing:
            raise SettingError(
                f"Missing required setting(s) {', '.join(missing)}; pass them as flags or in "
                "{config} FILE.yaml."
            )
        return cls(**merged)

    # -- output ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The settings as plain values (safe for YAML and ``torch.load(weights_only=True)``)."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The resolved configuration as YAML, readable back by :func:`load_config`."""
        header = "# deltaft resolved configuration: `deltaft train --config THIS_FILE`\n"
        return header + yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def differences(
        self, other: Mapping[str, Any], *, ignore: frozenset[str] | None = None
    ) -> dict[str, tuple[Any, Any]]:
        """``{key: (other's value, this value)}`` for each setting that differs, ``ignore`` aside.

        ``ignore`` defaults to :data:`RUNTIME_KEYS`.

        ``other`` is a stored configuration (e.g. a checkpoint's); keys it lacks take this
        config's value, keys this version does not know are ignored.
        """
        ignore = RUNTIME_KEYS if ignore is None else ignore
        mine = self.to_dict()
        theirs = {**mine, **_normalise_keys(other, "the stored configuration", strict=False)}
        return {
            key: (theirs[key], mine[key])
            for key in mine
            if key not in ignore and theirs[key] != mine[key]
        }


# Derived from the fields, so that a setting is declared once.
REQUIRED: tuple[str, ...] = tuple(
    f.name
    for f in dataclasses.fields(TrainConfig)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
)
RUNTIME_KEYS: frozenset[str] = frozenset(
    f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("runtime")
)


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML configuration file into a dict of settings (``yaml.safe_load``).

    Keys may use ``-`` or ``_`` (``batch-size`` = ``batch_size``). An empty file is ``{}``.

    Raises:
        ValueError: the file is missing or unreadable, is not YAML, is not a mapping, or has an
            unknown key (the message lists the valid keys).
    """
    return _normalise_keys(read_settings_file(path), f"config file {Path(path)}")


def _normalise_keys(
    values: Mapping[str, Any], origin: str, *, strict: bool = True
) -> dict[str, Any]:
    """``values`` with ``-`` in keys turned into ``_``; unknown keys raise (or are dropped)."""
    return normalise_keys(values, TrainConfig.keys(), origin, strict=strict)
