"""Supervised channel attention: how much each channel of a layer matters for the target task.

DELTA (Li et al., ICLR 2019) weights its feature-map penalty per channel. The weights come from the
source network with a new head trained on the target data: removing channel ``j`` of layer ``l``
raises the target loss by ``delta[l, j]``, and channels whose removal hurts more get more weight::

    delta[l, j] = mean over batches of ( CE(without channel j of l) - CE )   # CE: batch mean
    z[l, :]     = (delta[l, :] - mean(delta[l, :])) / std(delta[l, :])     # population std
    w[l, :]     = softmax(z[l, :] / T)                                      # T = 5 by default

The reference code computes ``delta`` with one full forward per channel per batch. The ``exact``
method here gives the same numbers far faster: it traces the model with :mod:`torch.fx`, runs the
part upstream of each layer once per batch, and replays only the downstream part for ``K`` masked
replicas of the layer's output at once.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor, fx, nn
from torch.nn import functional as F

from deltaft._utils import (
    LeafTracer,
    atomic_write,
    dtype_device,
    eval_mode,
    first_line,
    get_submodule,
)
from deltaft._utils import logits_of as _logits
from deltaft.heads import replace_head

__all__ = [
    "ChannelAttention",
    "attention_from_scores",
    "channel_removal_scores",
    "data_fingerprint",
    "estimate_channel_attention",
    "model_fingerprint",
]

logger = logging.getLogger(__name__)

Method = Literal["exact", "reference", "taylor"]
BatchNormMode = Literal["adapt", "frozen"]
LossFn = Callable[[Tensor, Tensor], Tensor]
Batch = tuple[Tensor, Tensor]

_METHODS: tuple[str, ...] = ("exact", "reference", "taylor")
_BN_MODES: tuple[str, ...] = ("adapt", "frozen")
_FORMAT = "deltaft.attention/1"
# Default chunk: K replicas of the largest activation a replay computes take about this many
# bytes. Small on the CPU, where large batches run slower per sample (measured on ResNet-50 and
# MobileNetV2 at 64 px: 8 MiB is near the best for both); large on accelerators.
_CHUNK_BYTES = {"cpu": 8 * 2**20}
_CHUNK_BYTES_ACCELERATOR = 256 * 2**20
_RERUN_HINT = "re-run `deltaft attention` for this model, data and layers"


# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------
def _take_batches(loader: Iterable[Any], n_batches: int) -> list[Batch]:
    """The first ``n_batches`` ``(x, y)`` pairs of ``loader`` (fewer if it runs out)."""
    _check_n_batches(n_batches)
    batches: list[Batch] = []
    for batch in loader:
        batches.append(_as_pair(batch))
        if len(batches) == n_batches:
            break
    if not batches:
        raise ValueError("The loader yielded no batches; expected (x, y) batches of target data.")
    if len(batches) < n_batches:
        logger.info("loader has only %d of the %d batches requested", len(batches), n_batches)
    return batches


def _check_n_batches(n_batches: int) -> None:
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}.")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:  # also rejects NaN
        raise ValueError(f"temperature must be > 0 (e.g. 5.0, the reference), got {temperature}.")


def _as_pair(batch: Any) -> Batch:
    if (
        isinstance(batch, (tuple, list))
        and len(batch) == 2
        and isinstance(batch[0], Tensor)
        and isinstance(batch[1], Tensor)
    ):
        return batch[0], batch[1]
    kind = f"a sequence of {len(batch)}" if isinstance(batch, (tuple, list)) else type(batch)
    raise ValueError(
        f"Expected the loader to yield (x, y) pairs of tensors, got {kind}; wrap the dataset so "
        "that it returns (image, label)."
    )


def _resolve_layers(model: nn.Module, layers: Sequence[str]) -> dict[str, nn.Module]:
    """Map each layer name to its module, validating that the names exist and are distinct."""
    if isinstance(layers, str) or not layers:
        raise ValueError(
            f"layers must be a non-empty list of module names, got {layers!r}; "
            "e.g. ['layer1.2.conv3', 'layer2.3.conv3']."
        )
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct, got {list(layers)}.")
    return {name: get_submodule(model, name) for name in layers}


def _probe_shapes(
    model: nn.Module, x: Tensor, modules: Mapping[str, nn.Module]
) -> dict[str, tuple[int, int, int, int]]:
    """Output shape ``(B, C, H, W)`` of every layer, checking that it is one."""
    seen: dict[str, list[Any]] = {name: [] for name in modules}

    def recorder(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            seen[name].append(tuple(output.shape) if isinstance(output, Tensor) else output)

        return hook

    handles = [m.register_forward_hook(recorder(name)) for name, m in modules.items()]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    shapes = {}
    for name, outputs in seen.items():
        if not outputs:
            raise ValueError(
                f"Layer {name!r} was not called in the model's forward pass; choose a module "
                "that runs on every input."
            )
        for shape in outputs:
            if not (isinstance(shape, tuple) and len(shape) == 4 and shape[0] == x.shape[0]):
                got = shape if isinstance(shape, tuple) else type(shape).__name__
                raise ValueError(
                    f"Layer {name!r} must output a (B, C, H, W) tensor with B = {x.shape[0]}, "
                    f"got {got}; choose a convolutional layer or block."
                )
        if len({shape[1] for shape in outputs}) > 1:
            raise ValueError(
                f"Layer {name!r} is called {len(outputs)} times with different channel counts "
                f"{[shape[1] for shape in outputs]}; choose a module that is called once."
            )
        shapes[name] = cast(tuple[int, int, int, int], outputs[0])
    return shapes


def _replica_losses(logits: Tensor, y: Tensor, k: int, loss_fn: LossFn | None) -> Tensor:
    """Mean loss of each of ``k`` replicas; ``logits`` is ``(k*B, ...)``, ``y`` is ``(B, ...)``."""
    if logits.shape[0] != k * y.shape[0]:
        raise _ReplayError(f"logits have batch {logits.shape[0]}, expected {k} x {y.shape[0]}")
    if loss_fn is None:
        targets = y.repeat(k, *([1] * (y.dim() - 1)))  # (k*B, ...)
        losses = F.cross_entropy(logits, targets, reduction="none")  # (k*B, ...)
        return losses.reshape(k, -1).mean(dim=1)  # (k,)
    replicas = logits.unflatten(0, (k, y.shape[0]))  # (k, B, ...)
    return torch.stack([loss_fn(replica, y) for replica in replicas])


def _loss(logits: Tensor, y: Tensor, loss_fn: LossFn | None) -> Tensor:
    return F.cross_entropy(logits, y) if loss_fn is None else loss_fn(logits, y)


def _channel_masks(channels: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(C, 1, C, 1, 1)``: replica ``j`` keeps every channel but ``j``."""
    keep = 1 - torch.eye(channels, dtype=dtype, device=device)  # (C, C)
    return keep[:, None, :, None, None]


def _mask_replicas(value: Tensor, mask: Tensor) -> Tensor:
    """``(K*B, C, H, W)`` times ``mask (K, 1, C, 1, 1)``: replica k loses channel k."""
    k = mask.shape[0]
    if value.dim() != 4 or value.shape[0] % k:
        raise _ReplayError(f"expected a (K*B, C, H, W) output with K = {k}, got {value.shape}")
    return (value.unflatten(0, (k, -1)) * mask).flatten(0, 1)


class _ReplayError(RuntimeError):
    """The batched replay saw shapes it did not expect: the model is not per-sample there."""


# ------------------------------------------------------------------------------------------------
# method="reference": one full forward per channel per batch
# ------------------------------------------------------------------------------------------------
def _zero_channel_hook(channel: int) -> Callable[[nn.Module, Any, Tensor], Tensor]:
    def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor:
        output = output.clone()
        output[:, channel] = 0
        return output

    return hook


def _reference_batch(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    modules: Mapping[str, nn.Module],
    shapes: Mapping[str, tuple[int, int, int, int]],
    loss_fn: LossFn | None,
) -> dict[str, Tensor]:
    base = _loss(_logits(model(x)), y, loss_fn)
    deltas = {}
    for name, module in modules.items():
        losses = []
        for j in range(shapes[name][1]):
            handle = module.register_forward_hook(_zero_channel_hook(j))
            try:
                losses.append(_loss(_logits(model(x)), y, loss_fn))
            finally:
                handle.remove()
        deltas[name] = torch.stack(losses) - base
    return deltas


# ------------------------------------------------------------------------------------------------
# method="exact" without a trace: batched full forwards, the layer's output masked by a hook
# ------------------------------------------------------------------------------------------------
def _batched_forward_logits(
    model: nn.Module, module: nn.Module, name: str, x: Tensor, mask: Tensor
) -> Tensor:
    """Logits ``(K*B, N)`` of ``model`` on ``x`` repeated K times, replica k without channel k."""
    k = mask.shape[0]

    def hook(mod: nn.Module, args: Any, output: Tensor) -> Tensor:
        if output.shape[0] != k * x.shape[0]:
            raise ValueError(
                f"Layer {name!r} returned a batch of {output.shape[0]} for an input batch of "
                f"{k * x.shape[0]}; the exact method needs a model that treats samples "
                "independently. Use method='reference' for this model."
            )
        return _mask_replicas(output, mask)

    handle = module.register_forward_hook(hook)
    try:
        return _logits(model(x.repeat(k, *([1] * (x.dim() - 1)))))  # input (K*B, ...)
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------------------
# method="exact" on an fx trace: cache the prefix, replay the downstream part on K replicas
# ------------------------------------------------------------------------------------------------
class _Root(nn.Module):
    """Traced instead of the model, so that fx stores its constants here, not on the model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Any:
        return self.model(x)


def _descendants(starts: Iterable[fx.Node]) -> set[fx.Node]:
    """``starts`` and every node that (transitively) uses one of them."""
    seen = set(starts)
    stack = list(seen)
    while stack:
        for user in stack.pop().users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return seen


def _last_uses(nodes: Sequence[fx.Node]) -> dict[fx.Node, list[fx.Node]]:
    """For each node of ``nodes``, the inputs whose last reader (within ``nodes``) it is."""
    last: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        for arg in node.all_input_nodes:
            last[arg] = node
    free: dict[fx.Node, list[fx.Node]] = {node: [] for node in nodes}
    for arg, node in last.items():
        free[node].append(arg)
    return free


def _nbytes(value: Any) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


def _map_tensors(value: Any, fn: Callable[[Tensor], Any]) -> Any:
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return type(value)(_map_tensors(v, fn) for v in value)
    return value


@dataclass
class _Plan:
    """What to replay for one layer.

    ``sources`` are the layer's call sites that read only unaffected values: their cached output
    is masked directly. ``nodes`` are recomputed (graph order, ending with the output node).
    ``consts`` are unaffected nodes that ``nodes`` read, each snapshotted just before its first
    reader runs in the full pass (so that later in-place ops cannot change it).
    """

    masked: set[fx.Node]
    sources: list[fx.Node]
    nodes: list[fx.Node]
    consts: list[fx.Node]
    free_after: dict[fx.Node, list[fx.Node]]
    affects_output: bool


class _GraphReplay:
    """Runs a traced model once, caching what each layer's replay needs, then replays a layer."""

    def __init__(self, model: nn.Module, modules: Mapping[str, nn.Module]) -> None:
        self.root = _Root(model)
        graph = LeafTracer(modules.values()).trace(self.root)
        self.nodes: list[fx.Node] = list(graph.nodes)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.output = next(n for n in self.nodes if n.op == "output")
        # Values that depend on the input are per-sample activations: only those are repeated.
        self.activations = _descendants(placeholders)
        self.callables = {
            n: self.root.get_submodule(str(n.target)) for n in self.nodes if n.op == "call_module"
        }
        self.plans: dict[str, _Plan] = {}
        for name, module in modules.items():
            call_sites = {n for n, m in self.callables.items() if m is module}
            if call_sites:  # else the layer sits inside another leaf: no node to mask
                self.plans[name] = self._plan(call_sites)
        self.free_after = _last_uses(self.nodes)
        self.nbytes: dict[fx.Node, int] = {}  # size of each value in the last full run
        self.snap_after: dict[fx.Node, list[str]] = {}
        self.snap_before: dict[fx.Node, list[tuple[str, fx.Node]]] = {}
        for name, plan in self.plans.items():
            for node in plan.sources:
                self.snap_after.setdefault(node, []).append(name)
            readers = {}
            for node in plan.nodes:
                for arg in node.all_input_nodes:
                    if arg in plan.consts and arg not in readers:
                        readers[arg] = node
            for arg, reader in readers.items():
                self.snap_before.setdefault(reader, []).append((name, arg))

    def _plan(self, masked: set[fx.Node]) -> _Plan:
        affected = _descendants(masked)
        sources = [n for n in self.nodes if n in masked and affected.isdisjoint(n.all_input_nodes)]
        nodes = [n for n in self.nodes if n in affected and n not in sources]
        consts = {a for n in nodes for a in n.all_input_nodes if a not in affected}
        ordered_consts = [n for n in self.nodes if n in consts]
        return _Plan(
            masked=masked,
            sources=sources,
            nodes=nodes,
            consts=ordered_consts,
            free_after=_last_uses(nodes),
            affects_output=self.output in affected,
        )

    def _run_node(self, node: fx.Node, env: Mapping[fx.Node, Any], x: Tensor | None) -> Any:
        args = cast(tuple[Any, ...], fx.node.map_arg(node.args, env.__getitem__))
        kwargs = cast(dict[str, Any], fx.node.map_arg(node.kwargs, env.__getitem__))
        if node.op == "placeholder":
            return x
        if node.op == "get_attr":
            value: Any = self.root
            for attr in str(node.target).split("."):
                value = getattr(value, attr)
            return value
        if node.op == "call_module":
            return self.callables[node](*args, **kwargs)
        if node.op == "call_function":
            return cast(Callable[..., Any], node.target)(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        return args[0]  # output

    def run(self, x: Tensor) -> tuple[Any, dict[str, dict[fx.Node, Any]]]:
        """Full forward; returns the output and, per layer, the values its replay reads."""
        env: dict[fx.Node, Any] = {}
        snaps: dict[str, dict[fx.Node, Any]] = {name: {} for name in self.plans}
        for node in self.nodes:
            for name, arg in self.snap_before.get(node, ()):
                value = env[arg]  # activations are copied: later in-place ops may change them
                snaps[name][arg] = (
                    _map_tensors(value, torch.clone) if arg in self.activations else value
                )
            env[node] = self._run_node(node, env, x)
            self.nbytes[node] = _nbytes(env[node])
            for name in self.snap_after.get(node, ()):
                snaps[name][node] = _map_tensors(env[node], torch.clone)
            for arg in self.free_after[node]:
                del env[arg]
        return env[self.output], snaps

    def peak_bytes(self, name: str) -> int:
        """Bytes of the largest value one replica of ``name``'s replay computes (last run)."""
        plan = self.plans[name]
        return max(self.nbytes.get(node, 0) for node in (*plan.sources, *plan.nodes))

    def replay(self, name: str, snaps: Mapping[fx.Node, Any], mask: Tensor, batch: int) -> Any:
        """Output for ``K = len(mask)`` replicas ``(K*B, ...)``: replica k has channel k masked."""
        plan = self.plans[name]
        k = mask.shape[0]

        def repeat(value: Tensor) -> Tensor:
            if value.dim() == 0 or value.shape[0] != batch:
                return value
            return value.repeat(k, *([1] * (value.dim() - 1)))  # (K*B, ...)

        env: dict[fx.Node, Any] = {}
        for node in plan.consts:
            value = snaps[node]
            env[node] = _map_tensors(value, repeat) if node in self.activations else value
        for node in plan.sources:
            env[node] = (snaps[node].unsqueeze(0) * mask).flatten(0, 1)  # (K*B, C, H, W)
        for node in plan.nodes:
            value = self._run_node(node, env, None)
            env[node] = _mask_replicas(value, mask) if node in plan.masked else value
            for arg in plan.free_after[node]:
                if arg is not self.output:
                    del env[arg]
        return env[self.output]


def _trace(model: nn.Module, modules: Mapping[str, nn.Module]) -> _GraphReplay | None:
    try:
        return _GraphReplay(model, modules)
    except Exception as error:  # fx raises many exception types on untraceable Python
        logger.warning(
            "torch.fx cannot trace %s (%s: %s); scoring with batched full forwards instead "
            "(still exact, but without reusing the computation upstream of each layer).",
            type(model).__name__,
            type(error).__name__,
            first_line(error),
        )
        return None


def _default_chunk(channels: int, per_replica: int, device: torch.device) -> int:
    """Channels per chunk: ``K * per_replica`` bytes stay within the device's budget."""
    budget = _CHUNK_BYTES.get(device.type, _CHUNK_BYTES_ACCELERATOR)
    return max(1, min(channels, budget // max(per_replica, 1)))


def _replay_deltas(
    replay: _GraphReplay,
    name: str,
    snaps: Mapping[fx.Node, Any],
    masks: Tensor,
    chunk: int,
    y: Tensor,
    base: Tensor,
    loss_fn: LossFn | None,
) -> Tensor:
    """``(C,)`` loss increases of one layer on one batch, from the downstream replay."""
    if not replay.plans[name].affects_output:  # no channel of this layer reaches the output
        return torch.zeros(masks.shape[0], dtype=masks.dtype, device=masks.device)
    parts = []
    for start in range(0, masks.shape[0], chunk):
        mask = masks[start : start + chunk]  # (K, 1, C, 1, 1)
        logits = _logits(replay.replay(name, snaps, mask, y.shape[0]))  # (K*B, N)
        parts.append(_replica_losses(logits, y, mask.shape[0], loss_fn) - base)
    return torch.cat(parts)


def _forward_deltas(
    model: nn.Module,
    module: nn.Module,
    name: str,
    x: Tensor,
    y: Tensor,
    base: Tensor,
    masks: Tensor,
    chunk: int,
    loss_fn: LossFn | None,
) -> Tensor:
    """``(C,)`` loss increases of one layer on one batch, from batched full forwards."""
    parts = []
    for start in range(0, masks.shape[0], chunk):
        mask = masks[start : start + chunk]  # (K, 1, C, 1, 1)
        logits = _batched_forward_logits(model, module, name, x, mask)  # (K*B, N)
        parts.append(_replica_losses(logits, y, mask.shape[0], loss_fn) - base)
    return torch.cat(parts)


def _exact_scores(
    model: nn.Module,
    batches: Sequence[Batch],
    modules: Mapping[str, nn.Module],
    shapes: Mapping[str, tuple[int, int, int, int]],
    loss_fn: LossFn | None,
    device: torch.device,
    chunk_size: int | None,
) -> dict[str, Tensor]:
    """Sum over batches of the ``(C,)`` loss increases, per layer (on ``device``)."""
    replay = _trace(model, modules)
    for name in modules:
        if replay is not None and name not in replay.plans:
            logger.warning(
                "Layer %r is inside another layer that fx keeps whole; scoring it with batched "
                "full forwards.",
                name,
            )
    totals: dict[str, Tensor] = {}
    masks: dict[str, Tensor] = {}
    for x_cpu, y_cpu in batches:
        x, y = x_cpu.to(device), y_cpu.to(device)
        output, snaps, replay = _full_forward(model, replay, x)
        logits = _logits(output)
        base = _loss(logits, y, loss_fn)
        for name, module in modules.items():
            channels = shapes[name][1]
            if name not in masks:
                masks[name] = _channel_masks(channels, logits.dtype, device)
            deltas = None
            if replay is not None and name in replay.plans:
                chunk = chunk_size or _default_chunk(channels, replay.peak_bytes(name), device)
                try:
                    deltas = _replay_deltas(
                        replay, name, snaps[name], masks[name], chunk, y, base, loss_fn
                    )
                except Exception as error:
                    logger.warning(
                        "Replaying the layers downstream of %r on batched replicas failed "
                        "(%s: %s); scoring it with batched full forwards instead.",
                        name,
                        type(error).__name__,
                        first_line(error),
                    )
                    del replay.plans[name]
            if deltas is None:
                per_replica = math.prod(shapes[name]) * logits.element_size()
                chunk = chunk_size or _default_chunk(channels, per_replica, device)
                deltas = _forward_deltas(
                    model, module, name, x, y, base, masks[name], chunk, loss_fn
                )
            totals[name] = totals[name] + deltas if name in totals else deltas
    return totals


def _full_forward(
    model: nn.Module, replay: _GraphReplay | None, x: Tensor
) -> tuple[Any, dict[str, dict[fx.Node, Any]], _GraphReplay | None]:
    """The model's output on ``x``, with the replay cache when the trace runs (else ``None``)."""
    if replay is not None:
        try:
            output, snaps = replay.run(x)
            return output, snaps, replay
        except Exception as error:
            logger.warning(
                "Running the fx trace of %s failed (%s: %s); scoring with batched full forwards "
                "instead.",
                type(model).__name__,
                type(error).__name__,
                first_line(error),
            )
    return model(x), {}, None


# ------------------------------------------------------------------------------------------------
# method="taylor": first-order estimate from one backward pass per batch
# ------------------------------------------------------------------------------------------------
def _taylor_batch(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    modules: Mapping[str, nn.Module],
    loss_fn: LossFn | None,
) -> dict[str, Tensor]:
    captured: dict[str, list[Tensor]] = {name: [] for name in modules}

    def recorder(name: str) -> Callable[[nn.Module, Any, Tensor], Tensor]:
        def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor:
            # Nothing upstream needs a gradient when the output does not require one.
            a = output if output.requires_grad else output.detach().requires_grad_(True)
            captured[name].append(a)
            return a.clone()  # later in-place ops must not change the captured `a`

        return hook

    handles = [m.register_forward_hook(recorder(name)) for name, m in modules.items()]
    try:
        with torch.enable_grad():
            loss = _loss(_logits(model(x)), y, loss_fn)
            flat = [a for name in modules for a in captured[name]]
            grads = torch.autograd.grad(loss, flat, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    deltas = {}
    position = 0
    for name in modules:
        total = torch.zeros(captured[name][0].shape[1], dtype=loss.dtype, device=loss.device)
        for a in captured[name]:
            grad = grads[position]
            position += 1
            if grad is not None:
                total = total - (grad * a.detach()).sum(dim=(0, 2, 3))  # (C,)
        deltas[name] = total
    return deltas


# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------
def channel_removal_scores(
    model: nn.Module,
    loader: Iterable[Any],
    layers: Sequence[str],
    *,
    n_batches: int = 4,
    method: Method = "exact",
    loss_fn: LossFn | None = None,
    device: torch.device | str | None = None,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    r"""How much the loss grows when each channel of each layer is removed.

    On the first ``n_batches`` batches ``(x_b, y_b)`` of ``loader``, with ``model`` in eval mode::

        delta[l][j] = 1/n_batches * sum_b ( L(x_b, y_b | output channel j of l set to 0)
                                            - L(x_b, y_b) )
        L = loss_fn(logits, y), by default F.cross_entropy(logits, y) (mean over the batch)

    Removing a channel zeroes ``output[:, j]`` of module ``l`` for every sample (for a bias-free
    convolution this is the reference's zeroing of filter ``j``). ``model``'s modes are restored
    afterwards and its parameters are not changed.

    Methods:

    * ``"exact"`` (default): the same numbers as ``"reference"`` (to float round-off), much faster.
      The model is traced with :mod:`torch.fx` (the layers kept as whole nodes); per batch, one
      forward caches what each layer's downstream part reads, then that part alone is replayed on
      ``K`` replicas of the layer's output (``(K*B, C, H, W)``, replica ``k`` without channel
      ``k``): one replay scores ``K`` channels. Cached activations that the replay reads (e.g. a
      skip connection) are repeated ``K`` times along the batch. This assumes that samples do
      not interact, true of eval-mode classifiers (BatchNorm uses its running statistics). A
      model fx cannot trace is scored with batched full forwards (a logged warning), still exact.
    * ``"reference"``: one full forward per channel per batch with a hook that zeroes the
      channel; slow and obviously correct.
    * ``"taylor"``: approximate, one backward per batch. First-order estimate of the same
      quantity: zeroing channel ``j`` changes ``a = output[:, j]`` by ``-a``, so
      ``delta[l][j] ~ -sum_{b,h,w} a[b, j, h, w] * dL/da[b, j, h, w]`` (mean over batches).

    Args:
        model: a classifier whose ``forward(x)`` returns logits (or a tuple / an object with
            ``.logits``), already on its device.
        loader: yields ``(x, y)`` batches; only the first ``n_batches`` are read.
        layers: dotted names of modules whose output is a ``(B, C, H, W)`` tensor.
        n_batches: number of batches to average over (fewer if ``loader`` runs out).
        method: ``"exact"``, ``"reference"`` or ``"taylor"``.
        loss_fn: ``(logits, y) -> scalar`` batch-mean loss; default cross-entropy.
        device: where batches go; default the device of the model's parameters.
        chunk_size: channels ``K`` scored per replay (``"exact"``). Default: ``K`` replicas of
            the largest activation the replay computes take about 8 MiB on the CPU (larger
            batches run slower per sample there) and 256 MiB on other devices.

    Returns:
        ``{layer: delta (C,)}`` in the order of ``layers``, on the CPU, in the model's dtype.

    Raises:
        ValueError: an unknown method or layer, ``n_batches < 1``, ``chunk_size < 1``, an empty
            loader, or a layer whose output is not ``(B, C, H, W)``.

    Example:
        >>> import torch, torchvision
        >>> model = torchvision.models.resnet18(num_classes=3)
        >>> data = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))]
        >>> scores = channel_removal_scores(model, data, ["layer4.1.conv2"], n_batches=1)
        >>> scores["layer4.1.conv2"].shape
        torch.Size([512])
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {', '.join(_METHODS)}; got {method!r}.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (or None for automatic), got {chunk_size}.")
    modules = _resolve_layers(model, layers)
    batches = _take_batches(loader, n_batches)
    dtype, model_device = dtype_device(model)
    device = torch.device(device) if device is not None else model_device
    with eval_mode(model):
        with torch.inference_mode():
            shapes = _probe_shapes(model, batches[0][0].to(device), modules)
        if method == "taylor":
            totals: dict[str, Tensor] = {}
            for x, y in batches:
                deltas = _taylor_batch(model, x.to(device), y.to(device), modules, loss_fn)
                for name, delta in deltas.items():
                    totals[name] = totals[name] + delta if name in totals else delta
        else:
            with torch.inference_mode():
                if method == "reference":
                    totals = {}
                    for x, y in batches:
                        deltas = _reference_batch(
                            model, x.to(device), y.to(device), modules, shapes, loss_fn
                        )
                        for name, delta in deltas.items():
                            totals[name] = totals[name] + delta if name in totals else delta
                else:
                    totals = _exact_scores(
                        model, batches, modules, shapes, loss_fn, device, chunk_size
                    )
    # One transfer at the end; clone() outside inference mode gives ordinary tensors.
    return {name: (totals[name] / len(batches)).to("cpu", dtype).clone() for name in modules}


def attention_from_scores(
    scores: Mapping[str, Tensor], temperature: float = 5.0
) -> dict[str, Tensor]:
    r"""Channel weights from removal scores: a softmax of z-scores, per layer.

    For each layer, with ``delta`` the ``(C,)`` scores::

        z = (delta - mean(delta)) / std(delta)       # population std: sqrt(mean((delta - mean)^2))
        w = softmax(z / temperature)                 # w >= 0, sum(w) = 1

    A layer whose scores are all equal gets uniform weights ``1 / C``.

    Args:
        scores: ``{layer: delta (C,)}``, e.g. from :func:`channel_removal_scores`.
        temperature: ``T > 0``; larger is flatter (``inf`` gives uniform weights).

    Returns:
        ``{layer: w (C,)}`` in the order of ``scores``, same dtype and device.

    Raises:
        ValueError: ``temperature <= 0``, or scores that are not finite, non-empty and 1-D.

    Example:
        >>> import torch
        >>> w = attention_from_scores({"conv": torch.tensor([0.0, 1.0, 2.0])})["conv"]
        >>> round(float(w.sum()), 6)
        1.0
    """
    _check_temperature(temperature)
    weights = {}
    for name, delta in scores.items():
        if delta.dim() != 1 or delta.numel() == 0:
            raise ValueError(
                f"Scores of layer {name!r} must be a non-empty (C,) tensor, got shape "
                f"{tuple(delta.shape)}."
            )
        if not delta.is_floating_point():
            delta = delta.to(torch.get_default_dtype())
        if not bool(torch.isfinite(delta).all()):
            raise ValueError(
                f"Scores of layer {name!r} contain NaN or infinite values; check that the head "
                "training converged (lower the learning rate) and the data are finite."
            )
        std = delta.std(correction=0)
        if bool((delta == delta[0]).all()) or float(std) == 0.0:
            weights[name] = torch.full_like(delta, 1.0 / delta.numel())
            continue
        z = (delta - delta.mean()) / std  # (C,)
        weights[name] = torch.softmax(z / temperature, dim=0)
    return weights


def model_fingerprint(model: nn.Module) -> str:
    """Content hash of ``model``'s weights: 16 hex digits of a SHA-256.

    The hash covers every ``state_dict()`` entry in sorted order: its name, dtype, shape and bytes
    (on the CPU, contiguous). Equal weights give equal fingerprints, whatever the device, the
    mode or the Python object.
    """
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode() + b"\0")
        if isinstance(value, Tensor):
            _hash_tensor(digest, value)
        else:  # extra state
            digest.update(repr(value).encode() + b"\0")
    return digest.hexdigest()[:16]


def data_fingerprint(loader: Iterable[Any], n_batches: int) -> str:
    """Content hash of the first ``n_batches`` ``(x, y)`` batches: 16 hex digits of a SHA-256.

    Only meaningful for a loader that yields the same batches each time (no shuffling);
    :func:`estimate_channel_attention` hashes the very batches it scores.
    """
    return _batches_fingerprint(_take_batches(loader, n_batches))


def _batches_fingerprint(batches: Sequence[Batch]) -> str:
    digest = hashlib.sha256()
    for x, y in batches:
        _hash_tensor(digest, x)
        _hash_tensor(digest, y)
    return digest.hexdigest()[:16]


def _hash_tensor(digest: Any, tensor: Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}\0".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


# ------------------------------------------------------------------------------------------------
# The value object
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ChannelAttention:
    """Per-layer channel weights for DELTA, with what they were computed from.

    Attributes:
        weights: ``{layer: w (C,)}``, ``w >= 0`` and ``sum(w) = 1`` per layer.
        scores: ``{layer: delta (C,)}``, the raw removal scores the weights come from.
        temperature: softmax temperature ``T`` used (``inf`` for uniform attention).
        n_batches: number of batches the scores average over (0 for uniform attention).
        model_fingerprint: :func:`model_fingerprint` of the source network (its original head
            included), ``""`` when the weights are not tied to a model (uniform).
        data_fingerprint: content hash of the scored batches, ``""`` when none.
        method: how the scores were computed (``exact``, ``reference``, ``taylor``, ``uniform``).
    """

    weights: dict[str, Tensor]
    scores: dict[str, Tensor]
    temperature: float
    n_batches: int
    model_fingerprint: str
    data_fingerprint: str
    method: str

    def __post_init__(self) -> None:
        if not self.weights or list(self.weights) != list(self.scores):
            raise ValueError(
                "weights and scores must name the same non-empty list of layers, got "
                f"{list(self.weights)} and {list(self.scores)}."
            )
        for name, w in self.weights.items():
            delta = self.scores[name]
            if w.dim() != 1 or w.numel() == 0 or delta.shape != w.shape:
                raise ValueError(
                    f"Layer {name!r}: weights and scores must both have shape (C,), got "
                    f"{tuple(w.shape)} and {tuple(delta.shape)}."
                )
            total = float(w.double().sum())
            if not (bool((w >= 0).all()) and abs(total - 1.0) <= 1e-4):
                raise ValueError(
                    f"Layer {name!r}: weights must be >= 0 and sum to 1, got sum {total:.6g}; "
                    "normalise them (attention_from_scores does)."
                )
        _check_temperature(self.temperature)
        if self.n_batches < 0:
            raise ValueError(f"n_batches must be >= 0, got {self.n_batches}.")

    @property
    def layers(self) -> list[str]:
        """Layer names, in order."""
        return list(self.weights)

    @property
    def channels(self) -> dict[str, int]:
        """``{layer: C}``."""
        return {name: w.numel() for name, w in self.weights.items()}

    @classmethod
    def uniform(cls, channels: Mapping[str, int]) -> ChannelAttention:
        """Uniform attention ``w = 1/C`` (scores 0), tied to no model or data.

        Example:
            >>> ChannelAttention.uniform({"layer4": 4}).weights["layer4"]
            tensor([0.2500, 0.2500, 0.2500, 0.2500])
        """
        for name, c in channels.items():
            if c < 1:
                raise ValueError(f"Layer {name!r} needs >= 1 channel, got {c}.")
        return cls(
            weights={name: torch.full((c,), 1.0 / c) for name, c in channels.items()},
            scores={name: torch.zeros(c) for name, c in channels.items()},
            temperature=math.inf,
            n_batches=0,
            model_fingerprint="",
            data_fingerprint="",
            method="uniform",
        )

    def check_compatible(
        self,
        layers: Sequence[str],
        channels: Mapping[str, int] | None = None,
        model_fingerprint: str | None = None,
    ) -> None:
        """Raise ``ValueError`` unless these weights fit the given layers, channels and model.

        Args:
            layers: the layers to regularize; must be exactly the attention's layers (any order).
            channels: ``{layer: C}`` of the model, for the layers it knows.
            model_fingerprint: the source network's :func:`model_fingerprint`; not checked
                when ``None`` or when the attention is tied to no model (uniform).
        """
        missing = [name for name in layers if name not in self.weights]
        extra = [name for name in self.weights if name not in set(layers)]
        if missing or extra:
            raise ValueError(
                f"The attention covers layers {self.layers}, but layers {list(layers)} were "
                f"requested (missing: {missing}, extra: {extra}); use the attention's layers or "
                f"{_RERUN_HINT}."
            )
        for name, c in (channels or {}).items():
            if name in self.weights and self.channels[name] != c:
                raise ValueError(
                    f"Layer {name!r} has {c} channels in the model but {self.channels[name]} in "
                    f"the attention; {_RERUN_HINT}."
                )
        if model_fingerprint is not None and self.model_fingerprint not in ("", model_fingerprint):
            raise ValueError(
                f"The attention was estimated for model {self.model_fingerprint}, but this model "
                f"is {model_fingerprint} (other weights); {_RERUN_HINT}."
            )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a safetensors file, atomically (temporary file, then ``os.replace``).

        Tensors ``weights/<layer>`` and ``scores/<layer>``; the other fields, JSON-encoded, in the
        file's metadata, with ``"format": "deltaft.attention/1"``.
        """
        path = Path(path)
        tensors = {}
        for name in self.layers:
            tensors[f"weights/{name}"] = self.weights[name].detach().cpu().contiguous()
            tensors[f"scores/{name}"] = self.scores[name].detach().cpu().contiguous()
        metadata = {
            "format": _FORMAT,
            "layers": json.dumps(self.layers),
            "temperature": json.dumps(self.temperature),
            "n_batches": json.dumps(self.n_batches),
            "model_fingerprint": json.dumps(self.model_fingerprint),
            "data_fingerprint": json.dumps(self.data_fingerprint),
            "method": json.dumps(self.method),
        }
        atomic_write(path, lambda handle: handle.write(save(tensors, metadata=metadata)))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        model: nn.Module | None = None,
        layers: Sequence[str] | None = None,
        channels: Mapping[str, int] | None = None,
        expected_fingerprint: str | None = None,
    ) -> ChannelAttention:
        """Read a file written by :meth:`save` (safetensors: no code is executed).

        Args:
            path: the file.
            model: the source network the attention will be used with: every layer must exist in
                it, ``nn.Conv2d`` / ``nn.BatchNorm2d`` layers must have the stored channel
                count, and its :func:`model_fingerprint` must match (unless the file is uniform).
            layers: when given, must be exactly the stored layers.
            channels: when given, ``{layer: C}`` that must match.
            expected_fingerprint: when given, the source's fingerprint that must match.

        Raises:
            ValueError: not a deltaft attention file, or any check above fails.
            FileNotFoundError: no file at ``path``.
        """
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        except FileNotFoundError:
            raise
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"{path} is not a readable safetensors file ({error}); {_RERUN_HINT}."
            ) from error
        if metadata.get("format") != _FORMAT:
            raise ValueError(
                f"{path} is not a deltaft attention file: format {metadata.get('format')!r}, "
                f"expected {_FORMAT!r}; {_RERUN_HINT}."
            )
        try:
            fields = {key: json.loads(metadata[key]) for key in _METADATA_KEYS}
            names: list[str] = fields.pop("layers")
            attention = cls(
                weights={name: tensors[f"weights/{name}"] for name in names},
                scores={name: tensors[f"scores/{name}"] for name in names},
                **fields,
            )
        except (KeyError, TypeError, json.JSONDecodeError) as error:
            raise ValueError(
                f"{path} is a corrupt deltaft attention file (missing or malformed {error}); "
                f"{_RERUN_HINT}."
            ) from error
        if model is not None:
            known = {}
            for name in attention.layers:
                module = get_submodule(model, name)
                if isinstance(module, nn.Conv2d):
                    known[name] = module.out_channels
                elif isinstance(module, nn.BatchNorm2d):
                    known[name] = module.num_features
            attention.check_compatible(attention.layers, known, model_fingerprint(model))
        if layers is not None or channels is not None or expected_fingerprint is not None:
            attention.check_compatible(
                attention.layers if layers is None else layers, channels, expected_fingerprint
            )
        return attention


_METADATA_KEYS = (
    "layers",
    "temperature",
    "n_batches",
    "model_fingerprint",
    "data_fingerprint",
    "method",
)


# ------------------------------------------------------------------------------------------------
# The reference procedure
# ------------------------------------------------------------------------------------------------
def _train_head(
    source: nn.Module,
    loader: Iterable[Any],
    num_classes: int,
    *,
    epochs: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    lr_step: int,
    lr_gamma: float,
    bn: BatchNormMode,
    head: str | None,
    device: torch.device | str | None,
) -> nn.Module:
    """A copy of ``source`` with a new head trained on ``loader``, everything else frozen."""
    model = copy.deepcopy(source)
    if device is not None:
        model.to(device)
    model.requires_grad_(False)
    head_name = replace_head(model, num_classes, head)  # the new nn.Linear requires grad
    params = list(model.get_submodule(head_name).parameters())
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=lr_step, gamma=lr_gamma)
    # "adapt": the frozen backbone runs in train mode, so BatchNorm statistics follow the target
    # data (and dropout is active), as in the reference code. "frozen": eval mode throughout.
    model.train(bn == "adapt")
    _, model_device = dtype_device(model)
    for epoch in range(epochs):
        total, count = torch.zeros((), device=model_device), 0
        for batch in loader:
            x, y = _as_pair(batch)
            loss = F.cross_entropy(_logits(model(x.to(model_device))), y.to(model_device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            count += 1
        if count == 0:
            raise ValueError(
                "The loader yielded no batches; expected (x, y) batches of target data."
            )
        logger.info(
            "attention head: epoch %d/%d, loss %.4f, lr %.3g",
            epoch + 1,
            epochs,
            float(total) / count,
            optimizer.param_groups[0]["lr"],
        )
        scheduler.step()
    return model.eval()


def estimate_channel_attention(
    source: nn.Module,
    loader: Iterable[Any],
    layers: Sequence[str],
    num_classes: int,
    *,
    epochs: int = 10,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    lr_step: int = 6,
    lr_gamma: float = 0.1,
    bn: BatchNormMode = "adapt",
    n_batches: int = 4,
    temperature: float = 5.0,
    method: Method = "exact",
    head: str | None = None,
    device: torch.device | str | None = None,
    score_loader: Iterable[Any] | None = None,
) -> ChannelAttention:
    """DELTA's supervised channel attention for ``source`` on the target data.

    The reference procedure, on a deep copy (``source`` itself is never modified):

    1. Replace the head with a new ``nn.Linear(in_features, num_classes)``, freeze every other
       parameter (``requires_grad_(False)``) and train the head for ``epochs`` epochs over
       ``loader``: cross-entropy, ``SGD(lr, momentum, weight_decay)``, lr times ``lr_gamma``
       every ``lr_step`` epochs. With ``bn="adapt"`` (reference) the frozen backbone runs in
       train mode, so BatchNorm running statistics adapt to the target data; with
       ``bn="frozen"`` everything runs in eval mode.
    2. ``delta = channel_removal_scores(copy, first n_batches of score_loader or loader)``.
    3. ``w = attention_from_scores(delta, temperature)``.

    Args:
        source: the pre-trained network (with its original head).
        loader: target training batches ``(x, y)``, ``y`` in ``[0, num_classes)``.
        layers: dotted names of the modules to weight; outputs must be ``(B, C, H, W)``.
        num_classes: number of target classes.
        epochs, lr, momentum, weight_decay, lr_step, lr_gamma: the head's training schedule.
        bn: ``"adapt"`` or ``"frozen"``, see above.
        n_batches: batches the removal scores average over.
        temperature: softmax temperature ``T``.
        method: see :func:`channel_removal_scores`; ``"exact"`` by default.
        head: the head's dotted name; found with :func:`~deltaft.heads.find_head` when ``None``.
        device: where to train and score; default the device of ``source``.
        score_loader: batches to score on; default ``loader`` (use a non-shuffled loader to
            make the result reproducible).

    Returns:
        A :class:`ChannelAttention` with the source's and the scored batches' fingerprints.

    Raises:
        ValueError: an invalid ``bn``, ``method``, ``epochs``, ``lr_step`` or layer name; see also
            :func:`channel_removal_scores`.

    Example:
        >>> import torch, torchvision
        >>> source = torchvision.models.resnet18(num_classes=10)
        >>> data = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))]
        >>> att = estimate_channel_attention(source, data, ["layer4.1.conv2"], 3, epochs=1)
        >>> att.channels
        {'layer4.1.conv2': 512}
    """
    if bn not in _BN_MODES:
        raise ValueError(f"bn must be one of {', '.join(_BN_MODES)}; got {bn!r}.")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {', '.join(_METHODS)}; got {method!r}.")
    if epochs < 0 or lr_step < 1:
        raise ValueError(f"Expected epochs >= 0 and lr_step >= 1, got {epochs} and {lr_step}.")
    _check_n_batches(n_batches)  # fail before training
    _check_temperature(temperature)
    _resolve_layers(source, layers)
    fingerprint = model_fingerprint(source)
    model = _train_head(
        source,
        loader,
        num_classes,
        epochs=epochs,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        lr_step=lr_step,
        lr_gamma=lr_gamma,
        bn=bn,
        head=head,
        device=device,
    )
    batches = _take_batches(loader if score_loader is None else score_loader, n_batches)
    scores = channel_removal_scores(model, batches, layers, n_batches=len(batches), method=method)
    return ChannelAttention(
        weights=attention_from_scores(scores, temperature),
        scores=scores,
        temperature=float(temperature),
        n_batches=len(batches),
        model_fingerprint=fingerprint,
        data_fingerprint=_batches_fingerprint(batches),
        method=method,
    )
