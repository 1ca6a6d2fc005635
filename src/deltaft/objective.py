"""The training objective of every method: task loss plus named regularizer parts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from torch import Tensor, nn
from torch.nn import functional as F

from deltaft._utils import get_submodule, logits_of
from deltaft.heads import find_head, head_parameter_names
from deltaft.hooks import FeatureExtractor
from deltaft.layers import Layout, channel_axis, default_layers, detect_layouts
from deltaft.layouts import PrefixTokens, prefix_by_layer
from deltaft.regularizers import functional as RF
from deltaft.regularizers.modules import (
    BSSRegularizer,
    DeltaRegularizer,
    FeatureMapRegularizer,
    L2Regularizer,
    L2SPRegularizer,
)
from deltaft.regularizers.source_head import CoTuningRegularizer, LwFRegularizer, kept_head
from deltaft.source import FrozenSource

if TYPE_CHECKING:
    from deltaft.attention import ChannelAttention

__all__ = ["METHODS", "Method", "TransferObjective"]

Method = Literal["l2", "l2sp", "fm", "delta", "cotuning", "lwf"]
METHODS: tuple[str, ...] = ("l2", "l2sp", "fm", "delta", "cotuning", "lwf")
# Methods regularized by weight decay (param_groups), as their authors' code: no reg/head.
_DECAY_METHODS = ("l2", "cotuning", "lwf")
# Parts computed by a kept copy of the source head from the new head's input.
_KEPT_HEAD_PARTS = ("reg/cotuning", "reg/lwf")
# Parts computed from the source's and the target's feature maps; the others from parameters.
_MAP_PARTS = ("reg/delta", "reg/fm")
# Parts computed from the head's input features (B, D).
_FEATURE_PARTS = ("reg/bss",)


class TransferObjective(nn.Module):
    r"""Loss of one fine-tuning step for ``l2``, ``l2sp``, ``fm`` or ``delta``.

    ``forward(x, y)`` returns a dict: ``logits``, ``task_loss`` (mean cross-entropy), each
    regularizer part as added to the loss, then ``loss`` (to call ``backward`` on)::

        l2:    loss = CE                        (decay through param_groups' weight_decay)
        l2sp:  loss = CE + reg/l2sp + reg/head
               reg/l2sp = alpha/2 * sum_{pre-trained p} ||p - p_source||^2
        fm:    loss = CE + reg/fm + reg/head
               reg/fm   = alpha * feature_map_penalty(FM_s, FM_t, reduction)
        delta: loss = CE + reg/delta + reg/head
               reg/delta = alpha * delta_penalty(FM_s, FM_t, attention, reduction)
        cotuning: loss = CE + reg/cotuning          (decay through param_groups' weight_decay)
               reg/cotuning = alpha * cotuning_loss(kept_head(features), y, relationship)
        lwf:   loss = CE + reg/lwf                  (decay through param_groups' weight_decay)
               reg/lwf = alpha * distillation_penalty(kept_head(features), source logits, T)
        reg/head = beta/2 * ||head parameters||^2          (the new classifier only)

    ``cotuning`` and ``lwf`` keep a trainable copy of the source's own classifier head (found
    under the same name as the new head, :func:`~deltaft.heads.find_head`), fed with the new
    head's input in the same forward (a pre-hook): :attr:`kept_head`, trained with the model
    (a third group of :meth:`param_groups`) and never used for predictions. For ``lwf`` the
    frozen source runs to that head's output (its logits). As in the authors' code both use
    plain weight decay (``weight_decay``, on every group) and no ``reg/head``.

    With ``bss > 0`` (any method) Batch Spectral Shrinkage (Chen et al., NeurIPS 2019) adds::

        reg/bss = bss * bss_penalty(features, bss_k)
                = bss * sum of the bss_k smallest squared singular values of features

    where ``features`` is the head's input in this forward, flattened to ``(B, D)`` (for a
    ResNet the pooled ``fc`` input), captured by a forward pre-hook on the head: no second
    forward. The authors use ``bss = 0.001``, ``bss_k = 1``.

    The regularizers are the modules of :attr:`terms`, an ``nn.ModuleDict`` keyed by the part
    they produce; ``loss`` sums ``task_loss`` and every part, in that order. ``FM_t`` are the
    target model's outputs of ``layers`` in its current mode; ``FM_s`` those of the
    :class:`~deltaft.source.FrozenSource` (eval mode, detached).

    Args:
        model: the network being fine-tuned, with its new head already in place.
        source: the pre-trained network, wrapped as ``FrozenSource(source, layers)`` with its
            defaults (copied, frozen, BatchNorm folded, truncated after the last layer), or a
            :class:`~deltaft.source.FrozenSource` configured otherwise, whose layers must then
            be the regularized ones. Its head is never used.
        method: ``"l2"``, ``"l2sp"``, ``"fm"`` or ``"delta"``.
        layers: regularized layers; default: the attention's layers when ``attention`` has
            them, else a given ``FrozenSource``'s, else :func:`~deltaft.layers.default_layers`
            of ``model``.
        attention: for ``delta``: a :class:`~deltaft.attention.ChannelAttention` (checked
            against the layers and the source's weights), a mapping of per-layer weights
            ``(C,)`` summing to 1, or ``"uniform"``.
        alpha: strength of the behavioural term (``fm``, ``delta``), of L2-SP, or of the kept
            head's term (the authors' ``trade_off`` of ``cotuning`` and ``lwf``).
        beta: strength of the head term (``l2sp``, ``fm``, ``delta``).
        head: dotted name of ``model``'s new head; found with :func:`~deltaft.heads.find_head`.
        reduction: ``"sum"`` over the batch (reference, ``alpha=0.01`` at batch 64) or ``"mean"``.
        weight_decay: the ``l2`` method's decay, applied by :meth:`param_groups`.
        input_size: image size of the dry forward pass that finds default layers.
        bss: strength ``eta`` of the Batch Spectral Shrinkage term on the head's input; 0 (the
            default) leaves it out.
        bss_k: how many of the smallest singular values it shrinks.
        relationship: for ``cotuning``: the category relationship ``(C_target, K_source)``
            (:func:`~deltaft.cotuning.estimate_relationship`).
        lwf_temperature: the distillation temperature ``T`` of ``lwf``.
        layouts: the regularized maps' layouts by layer name, or one for all (``"BCHW"``,
            ``"BHWC"`` for channels-last maps such as Swin's, ``"BNC"`` for tokens), e.g. from
            :func:`~deltaft.layers.check_layers`; each map is checked against its layout's rank
            in every forward. ``None``: found by :func:`~deltaft.layers.detect_layouts` from dry
            forwards of ``model`` at ``input_size`` and twice that, an error that says how to
            declare them when it cannot decide. Kept in :attr:`layouts`.
        prefix_tokens: leading tokens of ``(B, N, C)`` maps (class, distillation, register
            tokens) that ``fm`` and ``delta`` leave out, one count for every token layer or by
            layer name (see :func:`~deltaft.regularizers.functional.delta_penalty`); 0 keeps
            them. :func:`~deltaft.layouts.declared_prefix_tokens` reads a model's count; pass
            the same value to the attention estimate.

    Example:
        >>> import copy, torch, torchvision
        >>> source = torchvision.models.resnet18(num_classes=10)
        >>> model = copy.deepcopy(source)
        >>> model.fc = torch.nn.Linear(512, 3)
        >>> objective = TransferObjective(model, source, "delta", attention="uniform")
        >>> out = objective(torch.randn(2, 3, 64, 64), torch.tensor([0, 2]))
        >>> list(out)
        ['logits', 'task_loss', 'reg/delta', 'reg/head', 'loss']
        >>> list(objective.terms)
        ['reg/delta', 'reg/head']
    """

    def __init__(
        self,
        model: nn.Module,
        source: nn.Module | FrozenSource,
        method: Method = "delta",
        layers: Sequence[str] | None = None,
        attention: ChannelAttention | Mapping[str, Tensor] | Literal["uniform"] | None = None,
        alpha: float = 0.01,
        beta: float = 0.01,
        *,
        head: str | None = None,
        reduction: RF.Reduction = "sum",
        weight_decay: float = 1e-4,
        input_size: int = 224,
        bss: float = 0.0,
        bss_k: int = 1,
        layouts: Mapping[str, Layout] | Layout | None = None,
        relationship: Tensor | None = None,
        lwf_temperature: float = 3.0,
        prefix_tokens: PrefixTokens = 0,
    ) -> None:
        super().__init__()
        _check_arguments(method, layers, attention, alpha, beta, weight_decay)
        _check_source_head_arguments(method, relationship)
        _check_bss(bss, bss_k)
        self.bss, self.bss_k = float(bss), bss_k
        self.model = model
        self.method = method
        self.alpha, self.beta, self.weight_decay = float(alpha), float(beta), float(weight_decay)
        self.head = find_head(model, head)
        self.head_names = head_parameter_names(model, self.head)
        if not self.head_names:
            raise ValueError(f"Head {self.head!r} has no parameters; name the new classifier.")
        if not isinstance(get_submodule(model, self.head), nn.Linear):
            # A 1x1 conv classifier (SqueezeNet) takes a (B, C, H, W) map and is followed by
            # pooling: its input is not BSS's (B, D) features, its output not the logits.
            uses = [name for name, on in (("bss", self.bss > 0), (method, method in
                    ("cotuning", "lwf"))) if on]  # fmt: skip
            if uses:
                raise ValueError(
                    f"{' and '.join(uses)} need an nn.Linear classifier head (its (B, D) input, "
                    f"its logits); head {self.head!r} of this model is a "
                    f"{type(get_submodule(model, self.head)).__name__}. Use another method, or "
                    "name an nn.Linear head."
                )
        self.layers: list[str] = []
        self.layouts: dict[str, Layout] = {}
        if method in ("fm", "delta"):
            self.layers = self._resolve_layers(layers, attention, source, input_size)
            self.layouts = self._resolve_layouts(layouts, input_size)
        # lwf's teacher: the frozen source run to its head's output (its logits).
        source_layers = [self.head] if method == "lwf" else self.layers
        if isinstance(source, FrozenSource):
            self.source = source
            if source_layers and set(source.layers) != set(source_layers):
                raise ValueError(
                    f"The FrozenSource computes the maps of layers {source.layers}, but layers "
                    f"{source_layers} are needed; build it with the same layers."
                )
        else:
            self.source = FrozenSource(source, source_layers)
        self.lwf_temperature = float(lwf_temperature)
        self.prefix_tokens = prefix_tokens
        self.terms = nn.ModuleDict(self._build_terms(attention, reduction, relationship))

    # -- construction helpers -------------------------------------------------------------------
    def _resolve_layers(
        self, layers: Sequence[str] | None, attention: Any, source: nn.Module, input_size: int
    ) -> list[str]:
        if layers is not None:
            return list(layers)
        if attention is not None and not isinstance(attention, str):
            return list(getattr(attention, "layers", None) or attention.keys())
        if isinstance(source, FrozenSource) and source.layers:
            return list(source.layers)
        return default_layers(self.model, input_size=input_size)

    def _resolve_layouts(
        self, layouts: Mapping[str, Layout] | Layout | None, input_size: int
    ) -> dict[str, Layout]:
        if layouts is None:
            return detect_layouts(self.model, self.layers, input_size=input_size)
        if isinstance(layouts, str):
            channel_axis(layouts)  # checks the name
            return dict.fromkeys(self.layers, layouts)
        missing = [n for n in self.layers if n not in layouts]
        if missing:
            raise ValueError(f"No layout for layers {missing}; layouts cover {sorted(layouts)}.")
        for name in self.layers:
            channel_axis(layouts[name])  # each map is checked against its rank in the penalty
        return {name: layouts[name] for name in self.layers}

    def _build_terms(
        self, attention: Any, reduction: RF.Reduction, relationship: Tensor | None = None
    ) -> dict[str, nn.Module]:
        """The regularizers by the part they produce, in the order they are added to the loss."""
        terms: dict[str, nn.Module] = {}
        if self.method == "fm":
            terms["reg/fm"] = FeatureMapRegularizer(reduction, self.layouts, self.prefix_tokens)
        elif self.method == "delta":
            weights = self._attention_weights(attention)
            terms["reg/delta"] = DeltaRegularizer(
                self.layers, weights, reduction, self.layouts, self.prefix_tokens
            )
        elif self.method == "l2sp":
            terms["reg/l2sp"] = L2SPRegularizer(self._source_reference())
        elif self.method == "cotuning":
            assert relationship is not None  # _check_source_head_arguments
            head = kept_head(_source_head(self.source.network, self.head))
            terms["reg/cotuning"] = CoTuningRegularizer(head, relationship)
        elif self.method == "lwf":
            head = kept_head(_source_head(self.source.network, self.head))
            terms["reg/lwf"] = LwFRegularizer(head, self.lwf_temperature)
        if self.method not in _DECAY_METHODS:
            terms["reg/head"] = L2Regularizer(self.head_names)
        if self.bss > 0:
            terms["reg/bss"] = BSSRegularizer(self.bss_k)
        return terms

    def _attention_weights(self, attention: Any) -> Mapping[str, Tensor] | None:
        """Per-layer weights for :class:`DeltaRegularizer`, ``None`` for uniform attention."""
        if isinstance(attention, str):  # "uniform", checked by _check_arguments
            return None
        if hasattr(attention, "check_compatible"):
            attention.check_compatible(self.layers, model_fingerprint=self.source.fingerprint())
            self._check_prefix_tokens(attention)
            return dict(attention.weights)
        return dict(attention)

    def _check_prefix_tokens(self, attention: ChannelAttention) -> None:
        """Refuse estimated attention that scored other tokens than the penalty compares."""
        if attention.method == "uniform":
            return
        scored = prefix_by_layer(getattr(attention, "prefix_tokens", 0), self.layouts)
        penalized = prefix_by_layer(self.prefix_tokens, self.layouts)
        if scored != penalized:
            raise ValueError(
                f"The attention was scored with prefix tokens {scored or 'none'} left out, but "
                f"the penalty leaves out {penalized or 'none'}; estimate it with the same "
                "prefix_tokens (--exclude-prefix-tokens on the command line)."
            )

    def _source_reference(self) -> dict[str, Tensor]:
        source_params = dict(self.source.network.named_parameters())
        reference: dict[str, Tensor] = {}
        for name, param in self.model.named_parameters():
            if name in self.head_names:
                continue
            ref = source_params.get(name)
            if ref is None or ref.shape != param.shape:
                got = "missing" if ref is None else tuple(ref.shape)
                raise ValueError(
                    f"L2-SP needs the source to have parameter {name!r} of shape "
                    f"{tuple(param.shape)}, got {got}; pass the pre-trained network as source."
                )
            reference[name] = ref
        return reference

    # -- public API -----------------------------------------------------------------------------
    @property
    def kept_head(self) -> nn.Module | None:
        """The trainable copy of the source head (``cotuning``, ``lwf``), else ``None``."""
        for part in _KEPT_HEAD_PARTS:
            if part in self.terms:
                term = self.terms[part]
                assert isinstance(term, (CoTuningRegularizer, LwFRegularizer))
                return term.head
        return None

    def param_groups(
        self, lr: float | None = None, head_lr: float | None = None
    ) -> list[dict[str, Any]]:
        """Optimizer parameter groups for ``model``: ``backbone`` and ``head``, then
        ``source_head`` (the kept source head of ``cotuning`` and ``lwf``, at ``lr``).

        ``weight_decay`` is the objective's for methods ``l2``, ``cotuning`` and ``lwf`` and 0
        otherwise (the other methods regularize explicitly). ``lr`` / ``head_lr`` are set on
        the groups when given.

        Example:
            ``torch.optim.SGD(objective.param_groups(lr=0.01), lr=0.01, momentum=0.9)``
        """
        decay = self.weight_decay if self.method in _DECAY_METHODS else 0.0
        params = dict(self.model.named_parameters())
        head = [params[n] for n in self.head_names]
        backbone = [p for n, p in params.items() if n not in self.head_names]
        groups: list[dict[str, Any]] = [
            {"name": "backbone", "params": backbone, "weight_decay": decay},
            {"name": "head", "params": head, "weight_decay": decay},
        ]
        for group, group_lr in zip(
            groups, (lr, head_lr if head_lr is not None else lr), strict=True
        ):
            if group_lr is not None:
                group["lr"] = group_lr
        if self.kept_head is not None:
            kept = {"name": "source_head", "params": list(self.kept_head.parameters())}
            groups.append({**kept, "weight_decay": decay, **({"lr": lr} if lr else {})})
        return [g for g in groups if g["params"]]

    def _strength(self, part: str) -> float:
        """The factor of a part: ``beta`` (``reg/head``), ``bss`` (``reg/bss``), else ``alpha``."""
        if part == "reg/bss":
            return self.bss
        return self.beta if part == "reg/head" else self.alpha

    def _run_model(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The model's logits and the target maps of :attr:`layers` from one forward."""
        if self.layers:
            with FeatureExtractor(self.model, self.layers) as extractor:
                logits = logits_of(self.model(x))
                return logits, extractor.pop()
        return logits_of(self.model(x)), {}

    def _run_model_with_head_input(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """:meth:`_run_model` plus the head's input (as the head receives it), from a pre-hook."""
        inputs: list[Tensor] = []

        def capture(module: nn.Module, args: tuple[Any, ...]) -> None:
            inputs.append(args[0])

        handle = get_submodule(self.model, self.head).register_forward_pre_hook(capture)
        try:
            logits, target_maps = self._run_model(x)
        finally:
            handle.remove()
        if len(inputs) != 1:
            raise ValueError(
                f"{self._head_input_user()} needs the head {self.head!r} to run once per "
                f"forward, but it ran {len(inputs)} times; name the classifier the model calls "
                "once with head=."
            )
        return logits, target_maps, inputs[0]

    def _head_input_user(self) -> str:
        """Who needs the head's input, for error messages."""
        return "BSS" if self.kept_head is None else f"Method {self.method!r}"

    def forward(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        features: Tensor | None = None
        if "reg/bss" in self.terms or self.kept_head is not None:
            logits, target_maps, features = self._run_model_with_head_input(x)
        else:
            logits, target_maps = self._run_model(x)
        task_loss = F.cross_entropy(logits, y)
        out: dict[str, Tensor] = {"logits": logits, "task_loss": task_loss}
        loss = task_loss
        source_maps = (
            self.source(x, target_training=self.model.training) if self.source.layers else {}
        )
        params = dict(self.model.named_parameters()) if self.terms else {}
        for part, term in self.terms.items():
            if part in _FEATURE_PARTS:
                value = term(features.flatten(1))  # type: ignore[union-attr]  # (B, D)
            elif part == "reg/lwf":
                value = term(features, source_maps[self.head])
            elif part == "reg/cotuning":
                value = term(features, y)
            elif part in _MAP_PARTS:
                value = term(source_maps, target_maps)
            else:
                value = term(params)
            out[part] = self._strength(part) * value
            loss = loss + out[part]
        out["loss"] = loss
        return out


def _check_arguments(
    method: str,
    layers: Sequence[str] | None,
    attention: object,
    alpha: float,
    beta: float,
    weight_decay: float,
) -> None:
    """The checks that need nothing built: before the source is copied."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}.")
    for label, value in (("alpha", alpha), ("beta", beta), ("weight_decay", weight_decay)):
        if not value >= 0:  # also rejects NaN
            raise ValueError(f"{label} must be >= 0, got {value}.")
    if method != "delta" and attention is not None:
        raise ValueError(f"attention is only used by method 'delta', not {method!r}.")
    if method not in ("fm", "delta") and layers is not None:
        raise ValueError(f"layers are only used by methods 'fm' and 'delta', not {method!r}.")
    if method == "delta" and attention is None:
        raise ValueError(
            "method 'delta' needs channel attention: pass "
            "attention=estimate_channel_attention(...) or attention='uniform'."
        )
    if isinstance(attention, str) and attention != "uniform":
        raise ValueError(f"attention must be 'uniform' or weights, got {attention!r}.")


def _check_source_head_arguments(method: str, relationship: Tensor | None) -> None:
    if method == "cotuning" and relationship is None:
        raise ValueError(
            "method 'cotuning' needs the category relationship: pass "
            "relationship=deltaft.cotuning.estimate_relationship(...)."
        )
    if method != "cotuning" and relationship is not None:
        raise ValueError(f"relationship is only used by method 'cotuning', not {method!r}.")


def _source_head(network: nn.Module, head: str) -> nn.Module:
    """The source's own classifier, under the name of the model's new head."""
    try:
        return get_submodule(network, head)
    except (AttributeError, ValueError, KeyError):
        raise ValueError(
            f"The source network has no module {head!r} (the model's head); cotuning and lwf "
            "keep the source's classifier there: name it with head=."
        ) from None


def _check_bss(bss: float, bss_k: int) -> None:
    if not bss >= 0:  # also rejects NaN
        raise ValueError(f"bss must be >= 0, got {bss}.")
    if isinstance(bss_k, bool) or not isinstance(bss_k, int) or bss_k < 1:
        raise ValueError(f"bss_k must be a positive integer, got {bss_k!r}.")
