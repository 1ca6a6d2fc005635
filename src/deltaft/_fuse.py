"""Fold eval-mode BatchNorm into the preceding convolution of the frozen source network.

The source only ever runs in eval mode without gradients, so ``bn(conv(x))`` can be computed by one
convolution with rescaled weights: the same maps up to float round-off, one pass over the
activations fewer. Convolutions whose own output is regularized keep their BatchNorm, so every
hooked module still produces exactly what it produced before.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Collection

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from deltaft._utils import LeafTracer

logger = logging.getLogger(__name__)


def _fold(module: nn.Module, protected: Collection[str]) -> nn.Module:
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
    """A copy of ``source`` with eval-mode BatchNorm folded into convolutions, hooks by name intact.

    Modules named in ``keep`` stay addressable by the same dotted names and produce the same
    outputs (up to float round-off). If the model cannot be traced by ``torch.fx``, an unchanged
    copy is returned.
    """
    try:
        with torch.no_grad():
            return _fold(copy.deepcopy(source).eval(), keep)
    except Exception as exc:  # fx cannot trace data-dependent control flow; that is fine here
        logger.info("source not traceable (%s); BatchNorm left unfolded", exc)
        return copy.deepcopy(source).eval()
