"""Replay the part of a traced model downstream of one layer, on ``K`` masked replicas at once.

Internal to :mod:`deltaft.attention` (the ``"exact"`` method of
:func:`~deltaft.attention.channel_removal_scores`). :class:`GraphReplay` traces the model with
:mod:`torch.fx`, keeping the scored layers as whole nodes. One full run per batch caches, for each
layer, the values its downstream part reads; :meth:`GraphReplay.replay` then recomputes only that
part on ``(K*B, ...)`` replicas of the layer's output, replica ``k`` without channel ``k``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, fx, nn
from torch.nn import functional as F

from deltaft._utils import LeafTracer
from deltaft.attention._common import LossFn
from deltaft.layers import Layout, channel_axis

__all__ = ["GraphReplay", "channel_masks", "mask_replicas", "replica_losses"]


class _ReplayError(RuntimeError):
    """The batched replay saw shapes it did not expect: the model is not per-sample there."""


def channel_masks(
    channels: int, dtype: torch.dtype, device: torch.device, layout: Layout = "BCHW"
) -> Tensor:
    """Replica ``j`` keeps every channel but ``j``: ``(C, 1, C, 1, 1)`` for ``"BCHW"``,
    ``(C, 1, 1, 1, C)`` for ``"BHWC"`` and ``(C, 1, 1, C)`` for ``"BNC"`` (every position or
    token of channel ``j`` is zeroed)."""
    keep = 1 - torch.eye(channels, dtype=dtype, device=device)  # (C, C)
    rank = 3 if layout == "BNC" else 4
    shape = [channels, 1] + [1] * (rank - 1)
    shape[1 + channel_axis(layout)] = channels  # (C, 1, <the map's axes, C on its channel axis>)
    return keep.reshape(shape)


_SHAPES = {4: "(K*B, C, H, W)", 3: "(K*B, N, C)"}


def mask_replicas(value: Tensor, mask: Tensor) -> Tensor:
    """``(K*B, ...)`` times ``mask (K, 1, ...)`` of :func:`channel_masks`: replica k loses
    channel k."""
    k = mask.shape[0]
    if value.dim() != mask.dim() - 1 or value.shape[0] % k:
        want = _SHAPES.get(mask.dim() - 1, f"{mask.dim() - 1}-D")
        raise _ReplayError(f"expected a {want} output with K = {k}, got {value.shape}")
    return (value.unflatten(0, (k, -1)) * mask).flatten(0, 1)


def replica_losses(logits: Tensor, y: Tensor, k: int, loss_fn: LossFn | None) -> Tensor:
    """Mean loss of each of ``k`` replicas; ``logits`` is ``(k*B, ...)``, ``y`` is ``(B, ...)``."""
    if logits.shape[0] != k * y.shape[0]:
        raise _ReplayError(f"logits have batch {logits.shape[0]}, expected {k} x {y.shape[0]}")
    if loss_fn is None:
        targets = y.repeat(k, *([1] * (y.dim() - 1)))  # (k*B, ...)
        losses = F.cross_entropy(logits, targets, reduction="none")  # (k*B, ...)
        return losses.reshape(k, -1).mean(dim=1)  # (k,)
    replicas = logits.unflatten(0, (k, y.shape[0]))  # (k, B, ...)
    return torch.stack([loss_fn(replica, y) for replica in replicas])


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


def _tensors(value: Any) -> list[Tensor]:
    """The tensors of ``value`` in :func:`_map_tensors`'s order."""
    found: list[Tensor] = []
    _map_tensors(value, found.append)
    return found


def _batch_axis(one: Tensor, two: Tensor) -> int | None:
    """The axis that carries the samples, from a value at batch 1 (``one``) and at batch 2 of
    that same sample twice (``two``): the one axis whose size goes from 1 to 2 with both halves
    equal. ``None`` for a value that does not carry the samples (a constant, an index, a value
    that mixed or lost them): the replay must not repeat it."""
    if one.dim() != two.dim():
        return None
    axes = [i for i in range(one.dim()) if one.shape[i] != two.shape[i]]
    if len(axes) != 1 or (one.shape[axes[0]], two.shape[axes[0]]) != (1, 2):
        return None
    first, second = two.unbind(axes[0])
    if first.is_floating_point() or first.is_complex():  # batched kernels round per row
        same = torch.allclose(first, second, rtol=1e-4, atol=1e-6, equal_nan=True)
    else:
        same = torch.equal(first, second)
    return axes[0] if same else None


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


class GraphReplay:
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
        # Per cached activation, the batch axis of each of its tensors (None: not repeated);
        # found by the first run from probes at batch 1 and 2 (see _batch_axis).
        self.batch_axes: dict[fx.Node, list[int | None]] | None = None
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

    def _probe(self, x: Tensor) -> dict[fx.Node, list[Tensor]]:
        """The tensors of every cached activation for input ``x`` (a pass without snapshots)."""
        wanted = {n for plan in self.plans.values() for n in plan.consts if n in self.activations}
        env: dict[fx.Node, Any] = {}
        seen: dict[fx.Node, list[Tensor]] = {}
        for node in self.nodes:
            env[node] = self._run_node(node, env, x)
            if node in wanted:
                seen[node] = _tensors(env[node])
            for arg in self.free_after[node]:
                del env[arg]
        return seen

    def _find_batch_axes(self, x: Tensor) -> dict[fx.Node, list[int | None]]:
        """Which axis of each cached activation carries the samples.

        A value's first dimension equal to the batch size says nothing (a constant, the tokens
        of an ``(N, B, C)`` value, an index vector may have it): the graph runs on one sample
        and on that sample twice, and an axis carries the samples when it follows the batch
        size with equal halves."""
        one = self._probe(x[:1])
        two = self._probe(torch.cat([x[:1], x[:1]]))
        axes: dict[fx.Node, list[int | None]] = {}
        for node, tensors in one.items():
            pairs = zip(tensors, two[node], strict=False)
            found = [_batch_axis(a, b) for a, b in pairs]
            axes[node] = found if len(tensors) == len(two[node]) else [None] * len(tensors)
        return axes

    def run(self, x: Tensor) -> tuple[Any, dict[str, dict[fx.Node, Any]]]:
        """Full forward; returns the output and, per layer, the values its replay reads."""
        if self.batch_axes is None:
            self.batch_axes = self._find_batch_axes(x)
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

    def drop(self, name: str) -> None:
        """Stop replaying ``name``: forget its plan and stop caching what its replay reads."""
        del self.plans[name]
        for node, names in list(self.snap_after.items()):
            self.snap_after[node] = [n for n in names if n != name]
        for node, pairs in list(self.snap_before.items()):
            self.snap_before[node] = [(n, arg) for n, arg in pairs if n != name]

    def peak_bytes(self, name: str) -> int:
        """Bytes of the largest value one replica of ``name``'s replay computes (last run)."""
        plan = self.plans[name]
        return max(self.nbytes.get(node, 0) for node in (*plan.sources, *plan.nodes))

    def replay(self, name: str, snaps: Mapping[fx.Node, Any], mask: Tensor, batch: int) -> Any:
        """Output for ``K = len(mask)`` replicas ``(K*B, ...)``: replica k has channel k masked."""
        plan = self.plans[name]
        k = mask.shape[0]
        batch_axes = self.batch_axes or {}

        env: dict[fx.Node, Any] = {}
        for node in plan.consts:
            value = snaps[node]
            if node in batch_axes:
                value = _repeat_samples(value, iter(batch_axes[node]), k, batch)
            env[node] = value
        for node in plan.sources:
            env[node] = (snaps[node].unsqueeze(0) * mask).flatten(0, 1)  # (K*B, ...)
        for node in plan.nodes:
            value = self._run_node(node, env, None)
            env[node] = mask_replicas(value, mask) if node in plan.masked else value
            for arg in plan.free_after[node]:
                if arg is not self.output:
                    del env[arg]
        return env[self.output]


def _repeat_samples(value: Any, axes: Iterator[int | None], k: int, batch: int) -> Any:
    """``value`` with each tensor repeated ``k`` times along its batch axis (from ``axes``, in
    :func:`_map_tensors`'s order), replica-major: ``(..., K*B, ...)``."""

    def repeat(tensor: Tensor) -> Tensor:
        axis = next(axes, None)
        if axis is None:
            return tensor
        if tensor.shape[axis] != batch:
            raise _ReplayError(
                f"a cached value has {tensor.shape[axis]} samples on axis {axis}, expected {batch}"
            )
        times = [1] * tensor.dim()
        times[axis] = k
        return tensor.repeat(times)  # (..., K*B, ...)

    return _map_tensors(value, repeat)
