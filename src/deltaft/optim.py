"""Selective Projection Decay (SPD) optimizers: ``AdamSPD`` and ``SGDSPD``.

Tian et al., "Rethinking Weight Decay for Robust Fine-Tuning of Foundation Models" (NeurIPS 2024),
reference code ``adamSPD.py`` in GT-RIPL/Selective-Projection-Decay. SPD pulls a parameter tensor
back toward its pre-trained value (its *anchor*) only in some steps; it is an optimizer, not a
loss term, so it needs no feature maps and works for CNNs, ViTs and adapters alike.

For every parameter tensor ``theta`` with an anchor ``theta_0`` and gradient ``g``, one step is::

    theta~ = theta - Delta                      the plain Adam (or SGD) step, no weight decay
    c      = -sum(g * (theta - theta_0))        over the whole tensor, before the step
    if c < 0:
        r     = clamp((||theta~ - theta_0|| - ||theta - theta_0||) / ||theta~ - theta_0||, 0, 1)
        theta = theta~ - weight_decay * r * (theta~ - theta_0)
    else:
        theta = theta~

``||.||`` is the 2-norm of the flattened tensor. ``c < 0`` when the negative gradient points
toward the anchor (descent alone would move ``theta`` back); ``r`` is the fraction of the new
distance to the anchor that this step added, zero unless the step (momentum included) moved
*away* from the anchor. So the decay applies only to a step that moved away from the anchor
although the gradient pointed back. ``weight_decay = 1`` puts ``theta`` back at its previous
distance from the anchor (``(1 - r) * ||theta~ - theta_0|| = ||theta - theta_0||``).
``weight_decay`` (``lambda`` in the paper) is the strength of this projection and nothing else:
there is no L2 or decoupled weight decay.

Anchors live in the optimizer state (``state[p]["anchor"]``), so ``optimizer.state_dict()`` carries
them and a resumed run continues bit for bit. A group with ``anchor=False`` (e.g. a new head one
chooses not to anchor; the authors anchor every tensor) is plain Adam or SGD.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

__all__ = ["SGDSPD", "AdamSPD"]


class _SPDOptimizer(Optimizer):
    """Shared anchor bookkeeping and the selective projection of SPD.

    Each parameter group may carry ``"anchor"``: ``True`` (default: the parameters' values when the
    group is added, i.e. the pre-trained weights), ``False`` (no anchor, no decay), or a sequence of
    tensors, one per parameter and of the same shapes (explicit anchors, the authors' ``"pre"``).
    """

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        anchor = param_group.pop("anchor", True)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        params: list[Tensor] = group["params"]
        try:
            anchors = _anchors_of(anchor, params)
        except ValueError:
            self.param_groups.pop()  # a rejected group is not added
            raise
        group["anchor"] = bool(anchors)
        for p, a in zip(params if anchors else [], anchors, strict=True):
            self.state[p]["anchor"] = a

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step for every parameter with a gradient; returns the closure's loss, if any."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue  # no step counted, as in the authors' code
                if p.grad.is_sparse:
                    raise ValueError(f"{type(self).__name__} does not support sparse gradients.")
                self._step_one(p, p.grad, group)
        return loss

    def _step_one(self, p: Tensor, grad: Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _project(self, param: Tensor, new_p: Tensor, grad: Tensor, weight_decay: float) -> Tensor:
        """The SPD step on ``new_p`` (the plain update of ``param``), see the module docstring."""
        anchor = self.state[param].get("anchor")
        if anchor is None:
            return new_p
        condition = -torch.sum(torch.mul(grad, param - anchor))
        if condition < 0.0:
            curr = torch.linalg.vector_norm(new_p - anchor)
            prev = torch.linalg.vector_norm(param - anchor)
            ratio = ((curr - prev) / curr).clamp(0.0, 1.0)
            new_p = new_p - weight_decay * ratio * (new_p - anchor)
        return new_p


def _anchors_of(anchor: object, params: list[Tensor]) -> list[Tensor]:
    """The anchors a group's ``"anchor"`` option asks for: copies, one per parameter, or none."""
    if isinstance(anchor, bool):
        return [p.detach().clone() for p in params] if anchor else []
    if not (isinstance(anchor, Sequence) and all(isinstance(a, Tensor) for a in anchor)):
        raise ValueError(
            "A parameter group's 'anchor' must be True (the current values), False (no "
            f"anchor) or a list of tensors, one per parameter; got {type(anchor).__name__}."
        )
    anchors = list(anchor)
    if len(anchors) != len(params):
        raise ValueError(
            f"Got {len(anchors)} anchors for a group of {len(params)} parameters; "
            "give one anchor per parameter, in the same order."
        )
    for i, (a, p) in enumerate(zip(anchors, params, strict=True)):
        if a.shape != p.shape:
            raise ValueError(
                f"Anchor {i} has shape {tuple(a.shape)}, its parameter {tuple(p.shape)}; "
                "an anchor is the parameter's pre-trained value."
            )
    return [
        a.detach().to(device=p.device, dtype=p.dtype).clone()
        for a, p in zip(anchors, params, strict=True)
    ]


def _check_common(lr: float, weight_decay: float) -> None:
    if not lr >= 0.0:
        raise ValueError(f"lr must be >= 0, got {lr}.")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")


class AdamSPD(_SPDOptimizer):
    r"""Adam with Selective Projection Decay, exact to the authors' ``AdamSPD``.

    The plain step (``m``, ``v`` start at zero, ``t`` counts this parameter's steps)::

        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g          (amsgrad: vmax = max(vmax, v), used below)
        Delta = (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    then the projection of the module docstring, with ``weight_decay`` as its strength. The
    authors' defaults are kept (``lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0``; with
    ``weight_decay=0`` this is Adam). Parameters without a gradient are skipped (no step counted).

    Args:
        params: parameters or parameter groups; a group may set ``"anchor"`` (see
            :class:`_SPDOptimizer`): ``False`` for plain SGD on that group.
        lr: learning rate.
        betas: ``(beta1, beta2)``, each in ``[0, 1)``.
        eps: added to the denominator.
        weight_decay: SPD strength ``lambda >= 0``.
        amsgrad: use the running maximum of ``v``.

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([1.0]))
        >>> opt = AdamSPD([w], lr=0.1, weight_decay=1.0)
        >>> w.grad = torch.tensor([-1.0])  # c = -(-1 * 0) = 0: no projection
        >>> opt.step()
        >>> round(w.item(), 4)
        1.1
        >>> w.grad = torch.tensor([0.01])  # c < 0, but momentum still moves w away: project
        >>> opt.step()
        >>> round(w.item(), 4)  # weight_decay=1: back at the previous distance 0.1
        1.1
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
    ) -> None:
        _check_common(lr, weight_decay)
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}.")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}.")
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
        }
        super().__init__(params, defaults)

    def _step_one(self, p: Tensor, grad: Tensor, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        step = state["step"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if group["amsgrad"]:
            torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
            second = state["max_exp_avg_sq"]
        else:
            second = exp_avg_sq
        denom = (second.sqrt() / math.sqrt(bias_correction2)).add_(group["eps"])
        step_size = group["lr"] / bias_correction1
        new_p = p - step_size * exp_avg / denom
        p.copy_(self._project(p, new_p, grad, group["weight_decay"]))


class SGDSPD(_SPDOptimizer):
    r"""SGD with momentum, then the same Selective Projection Decay as :class:`AdamSPD`.

    The plain step is ``torch.optim.SGD``'s without weight decay (``b`` starts as ``g``)::

        b = momentum * b + (1 - dampening) * g
        d = g + momentum * b   (nesterov)   or   d = b
        Delta = lr * d                                  (d = g when momentum = 0)

    then the projection of the module docstring: its condition uses the raw gradient ``g``, as
    AdamSPD's does. Not in the authors' code, which ships only Adam; with ``weight_decay=0`` it
    is ``torch.optim.SGD``.

    Args:
        params: parameters or parameter groups; a group may set ``"anchor"``, ``False`` for plain
            Adam on that group.
        lr: learning rate.
        momentum: momentum factor ``>= 0``.
        dampening: dampening of the momentum ``>= 0``.
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening = 0``).
        weight_decay: SPD strength ``lambda >= 0``.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        _check_common(lr, weight_decay)
        if not momentum >= 0.0:
            raise ValueError(f"momentum must be >= 0, got {momentum}.")
        if not dampening >= 0.0:
            raise ValueError(f"dampening must be >= 0, got {dampening}.")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(
                f"nesterov needs momentum > 0 and dampening = 0, got momentum={momentum} and "
                f"dampening={dampening}."
            )
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "nesterov": nesterov,
            "weight_decay": weight_decay,
        }
        super().__init__(params, defaults)

    def _step_one(self, p: Tensor, grad: Tensor, group: dict[str, Any]) -> None:
        direction = grad
        momentum = group["momentum"]
        if momentum != 0:
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = torch.clone(grad).detach()
                state["momentum_buffer"] = buf
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
            direction = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
        new_p = p.add(direction, alpha=-group["lr"])
        p.copy_(self._project(p, new_p, grad, group["weight_decay"]))
