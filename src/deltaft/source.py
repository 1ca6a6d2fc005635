"""The frozen source network: a copy that computes feature maps and is never trained.

:class:`FrozenSource` owns every decision about running the pre-trained network: the copy and its
freezing, eval mode, BatchNorm folding (:func:`fold_batchnorm`), stopping after the last hooked
layer, the CPU memory layout, the optional oneDNN copy and how BatchNorm normalises. None of these
change the maps beyond float round-off, except ``bn="batch"``, which is a different choice of
statistics.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from deltaft._utils import LeafTracer, first_line
from deltaft.hooks import FeatureExtractor

__all__ = ["FrozenSource", "SourceBN", "fold_batchnorm"]

logger = logging.getLogger(__name__)

SourceBN = Literal["running", "batch"]
_BN_MODES: tuple[str, ...] = ("running", "batch")
# The oneDNN copy is kept when every map is within this fraction of max(1, max |plain map|).
_PACKED_RTOL = 1e-3


# ------------------------------------------------------------------------------------------------
# BatchNorm folding
# ------------------------------------------------------------------------------------------------
def _fold(module: nn.Module, protected: Collection[str]) -> nn.Module:
    """Fold every ``Conv2d -> BatchNorm2d`` pair of ``module``'s fx graph, but not the protected."""
    graph = LeafTracer(module.get_submodule(name) for name in protected).trace(module)
    gm = fx.GraphModule(module, graph)
    modules = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        conv_node = node.args[0]
        if not isinstance(conv_node, fx.Node) or conv_node.op != "call_module":
            continue
        conv = modules.get(conv_node.target)
        bn = modules[node.target]
        if (
            not isinstance(conv, nn.Conv2d)
            or conv_node.target in protected
            or node.target in protected
            or len(conv_node.users) != 1
            or not bn.track_running_stats
        ):
            continue
        fused = fuse_conv_bn_eval(conv, bn)
        parent, _, name = str(conv_node.target).rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, fused)
        node.replace_all_uses_with(conv_node)
        gm.graph.erase_node(node)
        folded += 1
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    # Protected modules that contain BatchNorm are folded inside: their outputs do not change.
    for name in protected:
        sub = gm.get_submodule(name)
        if any(isinstance(m, nn.BatchNorm2d) for m in sub.modules()) and len(list(sub.children())):
            parent, _, child = name.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, child, _fold(sub, ()))
    logger.debug("folded %d BatchNorm layers into convolutions", folded)
    return gm


def fold_batchnorm(source: nn.Module, keep: Collection[str]) -> nn.Module:
    """A copy of ``source`` in eval mode with BatchNorm folded into the preceding convolutions.

    In eval mode ``bn(conv(x))`` is one convolution with rescaled weights and bias
    (``w' = w * gamma / sqrt(running_var + eps)``, ``torch.nn.utils.fusion.fuse_conv_bn_eval``):
    the same maps up to float round-off, one pass over the activations fewer. A pair is folded
    when the convolution feeds only that BatchNorm and neither is named in ``keep``; modules
    named in ``keep`` stay addressable by the same dotted names and produce the same outputs
    (pairs inside them are folded). If ``torch.fx`` cannot trace the model, an unchanged copy
    (in eval mode) is returned, with an INFO log. ``source`` itself is never changed.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        >>> folded = fold_batchnorm(net, keep=[])
        >>> any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        False
        >>> x = torch.randn(1, 3, 8, 8)
        >>> torch.allclose(folded(x), net.eval()(x), atol=1e-6)
        True
    """
    try:
        with torch.no_grad():
            return _fold(copy.deepcopy(source).eval(), keep)
    except Exception as exc:  # fx cannot trace data-dependent control flow; that is fine here
        logger.info("source not traceable (%s); BatchNorm left unfolded", exc)
        return copy.deepcopy(source).eval()


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


def _model_fingerprint(network: nn.Module) -> str:
    from deltaft.attention import model_fingerprint  # the attention file's hash; no cycle

    return model_fingerprint(network)


@dataclass
class _Packing:
    """The oneDNN copy: a plain attribute, not a submodule (no state_dict entry, no ``.to()``)."""

    tried: bool = False
    network: nn.Module | None = None  # None after a try: the plain network is used


# ------------------------------------------------------------------------------------------------
# The frozen source
# ------------------------------------------------------------------------------------------------
class FrozenSource(nn.Module):
    r"""A frozen copy of a pre-trained network that returns the feature maps of named layers.

    ``source(x, target_training=...)`` returns ``{layer: map}`` (in ``layers`` order), computed
    under ``torch.inference_mode()``, so the maps are detached constants. The copy is made with
    ``copy.deepcopy``, frozen with ``requires_grad_(False)`` and always in eval mode (``train()``
    keeps it there), so its parameters and running statistics never change.

    How it runs, each choice giving the same maps up to float round-off unless stated:

    * ``fold_bn`` (with ``bn="running"`` and at least one layer): eval-mode BatchNorm is folded
      into the preceding convolutions, see :func:`fold_batchnorm`.
    * ``truncate``: the forward stops once the last of ``layers`` has produced its output
      (:class:`~deltaft.hooks.FeatureExtractor`'s ``stop_after_last``); the head never runs.
    * ``channels_last``: on the CPU, a 4-D input is given to the network in channels-last (NHWC)
      memory format, which oneDNN's convolutions run about 20 % faster (benchmarks/README.md).
      On other devices the input's own layout is kept.
    * ``mkldnn`` (CPU, float32, 4-D input, ``bn="running"``): the network runs as a oneDNN copy
      with weights packed once (``torch.utils.mkldnn``) instead of at every call: ResNet-50's
      source forward about 40 % faster, for more memory (the copy and oneDNN's caches), which
      is why it is off by default. The copy is made at the first eligible call and checked
      against the plain network on that batch: it is kept if, for every layer, the shapes agree
      and ``max |packed - plain| <= 1e-3 * max(1, max |plain|)``. Where torch cannot run the
      model that way (MobileNetV2's ReLU6, for one) or the maps differ, the plain network is
      used from then on, with an INFO log. It is a snapshot of the weights at that call.
    * ``bn``: ``"running"`` (the reference): BatchNorm uses the running (ImageNet) statistics,
      while a target model in train mode uses batch statistics, so the maps differ at step 0
      although the weights are equal. ``"batch"``: while the target model trains
      (``target_training=True``), BatchNorm normalises with the current batch's statistics
      (its running statistics are neither used nor updated), which removes that mismatch;
      otherwise it uses the running statistics.

    Args:
        source: the pre-trained network; copied, never changed.
        layers: dotted names of the modules whose outputs are returned; may be empty (then
            nothing runs and the maps are ``{}``, as for methods ``l2`` and ``l2sp``).
        bn: ``"running"`` or ``"batch"``, see above.
        fold_bn: fold BatchNorm into convolutions (only with ``bn="running"``).
        truncate: stop the forward after the last of ``layers``; ``False`` runs it whole.
        channels_last: NHWC input on the CPU.
        mkldnn: run a checked oneDNN copy on the CPU.

    Raises:
        ValueError: ``bn`` is neither ``"running"`` nor ``"batch"``.

    Example:
        >>> import torchvision
        >>> net = torchvision.models.resnet18(num_classes=10)
        >>> source = FrozenSource(net, ["layer1", "layer2"], bn="running")
        >>> maps = source(torch.randn(2, 3, 64, 64))
        >>> {name: tuple(m.shape) for name, m in maps.items()}
        {'layer1': (2, 64, 16, 16), 'layer2': (2, 128, 8, 8)}
        >>> source.train().training, any(p.requires_grad for p in source.parameters())
        (False, False)
    """

    def __init__(
        self,
        source: nn.Module,
        layers: Sequence[str] = (),
        *,
        bn: SourceBN = "running",
        fold_bn: bool = True,
        truncate: bool = True,
        channels_last: bool = True,
        mkldnn: bool = False,
    ) -> None:
        super().__init__()
        if bn not in _BN_MODES:
            raise ValueError(f"bn must be 'running' or 'batch', got {bn!r}.")
        self.layers: list[str] = [layers] if isinstance(layers, str) else list(layers)
        self.bn: SourceBN = bn
        self.truncate = truncate
        self.channels_last = channels_last
        self.mkldnn = mkldnn
        self.fold_bn = fold_bn
        fold = fold_bn and bn == "running" and bool(self.layers)
        # Folding changes the weights: record the fingerprint of the ones it was built from.
        self._fingerprint = _model_fingerprint(source) if fold else None
        network = fold_batchnorm(source, self.layers) if fold else copy.deepcopy(source)
        self.network = network.eval().requires_grad_(False)
        self._packing = _Packing()

    def train(self, mode: bool = True) -> FrozenSource:
        """Stay in eval mode whatever ``mode`` is: the source is frozen."""
        return super().train(False)

    def fingerprint(self) -> str:
        """:func:`~deltaft.attention.model_fingerprint` of the weights it was built from.

        For a folded network, that of the weights before folding, recorded at construction.
        """
        if self._fingerprint is not None:
            return self._fingerprint
        return _model_fingerprint(self.network)

    @property
    def backend(self) -> Literal["plain", "onednn", "undecided"]:
        """Which network computes the maps: ``"undecided"`` until the first eligible oneDNN try."""
        if self._packing.network is not None:
            return "onednn"
        return "undecided" if self.mkldnn and not self._packing.tried else "plain"

    def forward(self, x: Tensor, *, target_training: bool = False) -> dict[str, Tensor]:
        """The maps of ``layers`` for the batch ``x``, by layer name.

        Args:
            x: the batch, ``(B, 3, H, W)`` for an image network.
            target_training: whether the target model is in train mode; used by ``bn="batch"``.
        """
        if not self.layers:
            return {}
        if self._packable(x):
            if not self._packing.tried:
                return self._try_packed(x)
            if self._packing.network is not None:
                return self._packed_maps(self._packing.network, x)
        return self._plain_maps(x, batch_statistics=self.bn == "batch" and target_training)

    # -- how the maps are computed --------------------------------------------------------------
    def _packable(self, x: Tensor) -> bool:
        return (
            self.mkldnn
            and self.bn == "running"
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and x.dim() == 4
        )

    def _plain_maps(self, x: Tensor, *, batch_statistics: bool = False) -> dict[str, Tensor]:
        norm = _batch_statistics(self.network) if batch_statistics else contextlib.nullcontext()
        nhwc = self.channels_last and x.device.type == "cpu" and x.dim() == 4
        x = x.contiguous(memory_format=torch.channels_last) if nhwc else x
        with FeatureExtractor(self.network, self.layers, stop_after_last=self.truncate) as hooks:
            with torch.inference_mode(), norm:
                hooks.run(x)
            return hooks.pop()

    def _packed_maps(self, packed: nn.Module, x: Tensor) -> dict[str, Tensor]:
        with FeatureExtractor(packed, self.layers, stop_after_last=self.truncate) as hooks:
            with torch.inference_mode():
                hooks.run(x.contiguous().to_mkldnn())
            return {name: m.to_dense() for name, m in hooks.pop().items()}

    def _try_packed(self, x: Tensor) -> dict[str, Tensor]:
        """First eligible call: make the oneDNN copy, keep it only if its maps match the plain."""
        plain = self._plain_maps(x)
        self._packing.tried = True
        if not torch.backends.mkldnn.is_available():
            return plain
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # it is built on torch.jit
                from torch.utils import mkldnn

                packed = mkldnn.to_mkldnn(copy.deepcopy(self.network))
            maps = self._packed_maps(packed, x)
        except (RuntimeError, NotImplementedError, TypeError, ImportError) as error:
            logger.info(
                "Plain frozen source: torch cannot run it with oneDNN (%s).", first_line(error)
            )
            return plain
        for name, want in plain.items():
            scale = want.abs().max().clamp_min(1.0)
            got = maps[name]
            if got.shape != want.shape or (got - want).abs().max() > _PACKED_RTOL * scale:
                logger.info("Plain frozen source: its oneDNN copy differs at %r.", name)
                return plain
        self._packing.network = packed
        return maps  # every step of a run (a resumed one too) uses the same kind of maps
