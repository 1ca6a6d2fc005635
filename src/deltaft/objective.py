"""The training objective of every method: task loss plus named regularizer parts."""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from deltaft._fuse import fold_batchnorm
from deltaft._utils import logits_of as _logits
from deltaft.heads import find_head, head_parameter_names
from deltaft.hooks import FeatureExtractor
from deltaft.layers import default_layers
from deltaft.regularizers import functional as RF
from deltaft.regularizers.modules import (
    DeltaRegularizer,
    FeatureMapRegularizer,
    L2Regularizer,
    L2SPRegularizer,
)

if TYPE_CHECKING:
    from deltaft.attention import ChannelAttention

__all__ = ["METHODS", "Method", "TransferObjective"]

logger = logging.getLogger(__name__)

Method = Literal["l2", "l2sp", "fm", "delta"]
METHODS: tuple[str, ...] = ("l2", "l2sp", "fm", "delta")


@contextlib.contextmanager
def _batch_statistics(module: nn.Module) -> Iterator[None]:
    """Let every BatchNorm in ``module`` normalise with batch statistics, updating nothing."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.track_running_stats) for m in norms]
    try:
        for m in norms:
            # training + no tracking: batch statistics, running buffers neither read nor written
            m.training, m.track_running_stats = True, False
        yield
    finally:
        for m, (training, track) in zip(norms, saved, strict=True):
            m.training, m.track_running_stats = training, track


class TransferObjective(nn.Module):
    r"""Loss of one fine-tuning step for ``l2``, ``l2sp``, ``fm`` or ``delta``.

    ``forward(x, y)`` returns a dict: ``loss`` (to call ``backward`` on), ``logits``,
    ``task_loss`` (mean cross-entropy) and each regularizer part as added to the loss::

        l2:    loss = CE                        (decay through param_groups' weight_decay)
        l2sp:  loss = CE + reg/l2sp + reg/head
               reg/l2sp = alpha/2 * sum_{pre-trained p} ||p - p_source||^2
        fm:    loss = CE + reg/fm + reg/head
               reg/fm   = alpha * feature_map_penalty(FM_s, FM_t, reduction)
        delta: loss = CE + reg/delta + reg/head
               reg/delta = alpha * delta_penalty(FM_s, FM_t, attention, reduction)
        reg/head = beta/2 * ||head parameters||^2          (the new classifier only)

    ``FM_t`` are the target model's outputs of ``layers`` in its current mode; ``FM_s`` those of
    the frozen ``source`` in eval mode, which runs only as far as the last of ``layers``.

    Args:
        model: the network being fine-tuned, with its new head already in place.
        source: the pre-trained network; deep-copied, frozen (``requires_grad_(False)``) and kept
            in eval mode. Its head is never used.
        method: ``"l2"``, ``"l2sp"``, ``"fm"`` or ``"delta"``.
        layers: regularized layers; default :func:`~deltaft.layers.default_layers` of ``model``
            (or the attention's layers when ``attention`` is given).
        attention: for ``delta``: a :class:`~deltaft.attention.ChannelAttention`, a mapping of
            per-layer weights ``(C,)`` summing to 1, or ``"uniform"``.
        alpha: strength of the behavioural term (``fm``, ``delta``) or of L2-SP.
        beta: strength of the head term (all methods but ``l2``).
        head: dotted name of ``model``'s new head; found with :func:`~deltaft.heads.find_head`.
        reduction: ``"sum"`` over the batch (reference, ``alpha=0.01`` at batch 64) or ``"mean"``.
        weight_decay: the ``l2`` method's decay, applied by :meth:`param_groups`.
        input_size: image size of the dry forward pass that finds default layers.
        truncate_source: stop the source's forward after the last regularized layer (the
            default); ``False`` runs it whole, as a straightforward implementation would.
        fold_source_bn: fold the frozen source's eval-mode BatchNorm into its convolutions
            (``fm``/``delta`` only): the same maps up to float round-off, a faster forward.
            Regularized modules keep their names and outputs. Not used with
            ``source_bn="batch"``.
        source_bn: how the source's BatchNorm normalises. ``"running"`` (the reference): eval
            mode, ImageNet running statistics, while the target in train mode uses batch
            statistics, so the maps differ at step 0 although the weights are equal.
            ``"batch"``: the source's BatchNorm uses the current batch's statistics whenever the
            target model is in train mode (its running statistics never change), which removes
            that mismatch; in eval mode both use running statistics.
        source_channels_last: on the CPU, feed the frozen source its input in channels-last
            (NHWC) memory format, which oneDNN's convolutions run about 20 % faster
            (benchmarks/README.md): the same maps up to float round-off. ``False`` keeps the
            input's own layout. On other devices the input's layout is always kept (use the
            trainer's ``channels_last`` there).
        source_mkldnn: on the CPU (float32, ``source_bn="running"``), run the frozen source as a
            oneDNN copy with weights packed once (``torch.utils.mkldnn``) instead of re-packing
            them at every call: ResNet-50's source forward about 40 % faster, at the cost of
            more memory (the copy and oneDNN's caches; benchmarks/README.md), which is why it is
            off by default. The copy is made at the first CPU forward and checked against the
            plain source on that batch (same maps up to float round-off); where torch cannot run
            a model that way (MobileNetV2's ReLU6, for one) or the maps differ, the plain source
            is used, with an INFO log. It is a snapshot: after changing ``source``'s weights,
            build a new objective.

    Example:
        >>> import copy, torch, torchvision
        >>> source = torchvision.models.resnet18(num_classes=10)
        >>> model = copy.deepcopy(source)
        >>> model.fc = torch.nn.Linear(512, 3)
        >>> objective = TransferObjective(model, source, "delta", attention="uniform")
        >>> out = objective(torch.randn(2, 3, 64, 64), torch.tensor([0, 2]))
        >>> sorted(out)
        ['logits', 'loss', 'reg/delta', 'reg/head', 'task_loss']
    """

    def __init__(
        self,
        model: nn.Module,
        source: nn.Module,
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
        truncate_source: bool = True,
        fold_source_bn: bool = True,
        source_bn: Literal["running", "batch"] = "running",
        source_channels_last: bool = True,
        source_mkldnn: bool = False,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}.")
        for label, value in (("alpha", alpha), ("beta", beta), ("weight_decay", weight_decay)):
            if not value >= 0:  # also rejects NaN
                raise ValueError(f"{label} must be >= 0, got {value}.")
        if source_bn not in ("running", "batch"):
            raise ValueError(f"source_bn must be 'running' or 'batch', got {source_bn!r}.")
        if method != "delta" and attention is not None:
            raise ValueError(f"attention is only used by method 'delta', not {method!r}.")
        self.model = model
        self.method = method
        self.alpha, self.beta, self.weight_decay = float(alpha), float(beta), float(weight_decay)
        self.head = find_head(model, head)
        self.head_names = head_parameter_names(model, self.head)
        if not self.head_names:
            raise ValueError(f"Head {self.head!r} has no parameters; name the new classifier.")
        self.source = copy.deepcopy(source).eval().requires_grad_(False)
        self.truncate_source = truncate_source
        self.source_channels_last = source_channels_last
        self.source_mkldnn = source_mkldnn
        # The oneDNN copy of the source: None until tried, False where it cannot be used. Held in
        # a list so that it is no submodule (no state_dict entry, not moved by .to()).
        self._packed: list[Any] = [None]
        self.source_bn = source_bn
        self.layers: list[str] = []
        self.feature_reg: nn.Module | None = None
        self.l2sp: L2SPRegularizer | None = None
        self.head_reg = L2Regularizer(self.head_names)
        if method in ("fm", "delta"):
            self.layers = self._resolve_layers(layers, attention, input_size)
            if method == "fm":
                self.feature_reg = FeatureMapRegularizer(reduction)
            else:
                self.feature_reg = DeltaRegularizer(
                    self.layers, self._attention_weights(attention), reduction
                )
            if fold_source_bn and source_bn == "running":
                self.source = fold_batchnorm(self.source, self.layers).requires_grad_(False)
        elif layers is not None:
            raise ValueError(f"layers are only used by methods 'fm' and 'delta', not {method!r}.")
        if method == "l2sp":
            self.l2sp = L2SPRegularizer(self._source_reference())

    # -- construction helpers -------------------------------------------------------------------
    def _resolve_layers(
        self, layers: Sequence[str] | None, attention: Any, input_size: int
    ) -> list[str]:
        if layers is not None:
            return list(layers)
        if attention is not None and not isinstance(attention, str):
            return list(getattr(attention, "layers", None) or attention.keys())
        return default_layers(self.model, input_size=input_size)

    def _attention_weights(self, attention: Any) -> Mapping[str, Tensor] | None:
        if attention is None:
            raise ValueError(
                "method 'delta' needs channel attention: pass "
                "attention=estimate_channel_attention(...) or attention='uniform'."
            )
        if isinstance(attention, str):
            if attention != "uniform":
                raise ValueError(f"attention must be 'uniform' or weights, got {attention!r}.")
            return None
        if hasattr(attention, "check_compatible"):
            from deltaft.attention import model_fingerprint

            attention.check_compatible(
                self.layers, model_fingerprint=model_fingerprint(self.source)
            )
            return dict(attention.weights)
        return dict(attention)

    def _source_reference(self) -> dict[str, Tensor]:
        source_params = dict(self.source.named_parameters())
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
    def train(self, mode: bool = True) -> TransferObjective:
        """Set the target model's mode; the source always stays in eval mode."""
        super().train(mode)
        self.source.eval()
        return self

    def param_groups(
        self, lr: float | None = None, head_lr: float | None = None
    ) -> list[dict[str, Any]]:
        """Optimizer parameter groups for ``model``: ``backbone`` and ``head``.

        ``weight_decay`` is the objective's for method ``l2`` and 0 otherwise (the other methods
        regularize explicitly). ``lr`` / ``head_lr`` are set on the groups when given.

        Example:
            ``torch.optim.SGD(objective.param_groups(lr=0.01), lr=0.01, momentum=0.9)``
        """
        decay = self.weight_decay if self.method == "l2" else 0.0
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
        return [g for g in groups if g["params"]]

    def _plain_source_maps(self, x: Tensor) -> dict[str, Tensor]:
        batch_stats = self.source_bn == "batch" and self.model.training
        norm = _batch_statistics(self.source) if batch_stats else contextlib.nullcontext()
        nhwc = self.source_channels_last and x.device.type == "cpu" and x.dim() == 4
        x_source = x.contiguous(memory_format=torch.channels_last) if nhwc else x
        stop = self.truncate_source
        with FeatureExtractor(self.source, self.layers, stop_after_last=stop) as extractor:
            with torch.inference_mode(), norm:
                extractor.run(x_source)
            return extractor.pop()

    def _packed_source_maps(self, packed: nn.Module, x: Tensor) -> dict[str, Tensor]:
        stop = self.truncate_source
        with FeatureExtractor(packed, self.layers, stop_after_last=stop) as extractor:
            with torch.inference_mode():
                extractor.run(x.contiguous().to_mkldnn())
            return {name: m.to_dense() for name, m in extractor.pop().items()}

    def _source_maps(self, x: Tensor) -> dict[str, Tensor]:
        """The frozen source's maps of ``x``: from the oneDNN copy where it works, else plain."""
        eligible = (
            self.source_mkldnn
            and self.source_bn == "running"
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and x.dim() == 4
        )
        packed = self._packed[0]
        if eligible and packed is None:
            return self._try_packed_source(x)
        if eligible and packed is not False:
            return self._packed_source_maps(packed, x)
        return self._plain_source_maps(x)

    def _try_packed_source(self, x: Tensor) -> dict[str, Tensor]:
        """First CPU call: make the oneDNN copy, keep it only if its maps match the plain ones."""
        plain = self._plain_source_maps(x)
        self._packed[0] = False
        if not torch.backends.mkldnn.is_available():
            return plain
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # it is built on torch.jit
                from torch.utils import mkldnn

                packed = mkldnn.to_mkldnn(copy.deepcopy(self.source))
            maps = self._packed_source_maps(packed, x)
        except (RuntimeError, NotImplementedError, TypeError, ImportError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            logger.info("Plain frozen source: torch cannot run it with oneDNN (%s).", reason)
            return plain
        for name, want in plain.items():
            scale = want.abs().max().clamp_min(1.0)
            if maps[name].shape != want.shape or (maps[name] - want).abs().max() > 1e-3 * scale:
                logger.info("Plain frozen source: its oneDNN copy differs at %r.", name)
                return plain
        self._packed[0] = packed
        return maps  # every step of a run (a resumed one too) uses the same kind of maps

    def forward(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        if self.feature_reg is None:
            logits = _logits(self.model(x))
            target_maps: dict[str, Tensor] = {}
        else:
            with FeatureExtractor(self.model, self.layers) as extractor:
                logits = _logits(self.model(x))
                target_maps = extractor.pop()
        task_loss = F.cross_entropy(logits, y)
        out: dict[str, Tensor] = {"logits": logits, "task_loss": task_loss}
        loss = task_loss
        if self.feature_reg is not None:
            source_maps = self._source_maps(x)
            key = "reg/delta" if self.method == "delta" else "reg/fm"
            out[key] = self.alpha * self.feature_reg(source_maps, target_maps)
            loss = loss + out[key]
        params = dict(self.model.named_parameters()) if self.method != "l2" else {}
        if self.l2sp is not None:
            out["reg/l2sp"] = self.alpha * self.l2sp(params)
            loss = loss + out["reg/l2sp"]
        if self.method != "l2":
            out["reg/head"] = self.beta * self.head_reg(params)
            loss = loss + out["reg/head"]
        out["loss"] = loss
        return out
