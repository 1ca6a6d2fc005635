"""``method="taylor"``: first-order removal scores from one backward pass per batch.

Internal to :mod:`deltaft.attention` (see :func:`~deltaft.attention.channel_removal_scores`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn

from deltaft._probe import output_map, replace_map
from deltaft._utils import logits_of as _logits
from deltaft.attention._common import LossFn, batch_loss

__all__ = ["taylor_batch"]


def taylor_batch(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    modules: Mapping[str, nn.Module],
    axes: Mapping[str, int],
    prefixes: Mapping[str, int],
    loss_fn: LossFn | None,
) -> dict[str, Tensor]:
    """Per layer, ``delta[j] ~ -sum_{b,p} a[b, p, j] * dL/da[b, p, j]``, shape ``(C,)``: ``a`` the
    layer's output (a tuple's first element), channels on ``axes[name]``, the positions ``p``
    every position or token ``n >= prefixes[name]``; summed over the layer's calls."""
    captured: dict[str, list[Tensor]] = {name: [] for name in modules}

    def recorder(name: str) -> Callable[[nn.Module, Any, Any], Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            found = cast(Tensor, output_map(output))  # a tuple's first element is the map
            # Nothing upstream needs a gradient when the output does not require one.
            a = found if found.requires_grad else found.detach().requires_grad_(True)
            captured[name].append(a)
            return replace_map(output, a.clone())  # later in-place ops must not change `a`

        return hook

    handles = [m.register_forward_hook(recorder(name)) for name, m in modules.items()]
    try:
        with torch.enable_grad():
            loss = batch_loss(_logits(model(x)), y, loss_fn)
            flat = [a for name in modules for a in captured[name]]
            grads = torch.autograd.grad(loss, flat, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    deltas = {}
    position = 0
    for name in modules:
        axis = axes[name]
        channels = captured[name][0].shape[axis]
        total = torch.zeros(channels, dtype=loss.dtype, device=loss.device)
        for a in captured[name]:
            grad = grads[position]
            position += 1
            if grad is not None:
                others = tuple(d for d in range(a.dim()) if d != axis)  # all but the channels
                product = grad * a.detach()
                if prefixes[name]:
                    product = product[:, prefixes[name] :]  # (B, N - P, C): tokens n >= P
                total = total - product.sum(dim=others)  # (C,)
        deltas[name] = total
    return deltas
