"""Terms on a kept copy of the source classifier head: LwF distillation and Co-Tuning.

Both methods keep the pre-trained network's own classifier (e.g. its 1000 ImageNet classes) as a
second, trainable head next to the new one, fed with the same input: the features the new head
receives in the same forward pass (captured by a forward pre-hook, so no second forward of the
fine-tuned network). Each module below owns that kept head (:attr:`head`, trained with the rest
of the network, in the module's ``state_dict``) and computes one loss part from its logits:

* :class:`LwFRegularizer`: ``distillation_penalty(head(features), teacher_logits, T)``, the
  teacher being the frozen source's logits on the same batch (Li and Hoiem, 2016);
* :class:`CoTuningRegularizer`: ``cotuning_loss(head(features), labels, R)`` with the category
  relationship ``R`` kept as a buffer (You et al., NeurIPS 2020).

The strength (the authors' ``trade_off``) is applied by the caller, as for every regularizer.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from deltaft.cotuning import cotuning_loss
from deltaft.regularizers.functional import distillation_penalty

__all__ = ["CoTuningRegularizer", "LwFRegularizer", "kept_head"]


def kept_head(head: nn.Module) -> nn.Module:
    """A trainable copy of the source's classifier ``head`` (the source is never changed).

    Raises:
        ValueError: ``head`` has no parameters (nothing to keep or train).
    """
    kept = copy.deepcopy(head).requires_grad_(True)
    if not any(True for _ in kept.parameters()):
        raise ValueError(
            f"The source head is a {type(head).__name__} without parameters; cotuning and lwf "
            "keep a classifier (an nn.Linear): name it with head=."
        )
    return kept.train()


class _KeptHead(nn.Module):
    """Holds :attr:`head`; :meth:`source_logits` runs it on the new head's input."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def source_logits(self, features: Tensor) -> Tensor:
        """The kept head's logits ``(B, K)`` for the new head's input ``features``."""
        logits = self.head(features)
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(
                f"The kept source head must map the head input to logits (B, K), got {shape}; "
                "name the final classifier with head=."
            )
        return logits


class LwFRegularizer(_KeptHead):
    r"""LwF: the kept source head distils the frozen source's logits.

    ``forward(features, teacher_logits)`` returns
    ``distillation_penalty(head(features), teacher_logits, temperature)``, i.e.
    ``T^2 / B * sum_b KL(softmax(teacher_b / T) || softmax(head(features)_b / T))``.

    Args:
        head: the trainable copy of the source head (see :func:`kept_head`).
        temperature: ``T > 0``.

    Example:
        >>> reg = LwFRegularizer(torch.nn.Linear(4, 3), temperature=2.0)
        >>> f = torch.randn(5, 4)
        >>> float(reg(f, reg.head(f).detach()))
        0.0
    """

    def __init__(self, head: nn.Module, temperature: float) -> None:
        super().__init__(head)
        if isinstance(temperature, bool) or not 0 < temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")
        self.temperature = float(temperature)

    def forward(self, features: Tensor, teacher_logits: Tensor) -> Tensor:
        return distillation_penalty(self.source_logits(features), teacher_logits, self.temperature)


class CoTuningRegularizer(_KeptHead):
    r"""Co-Tuning: the kept source head learns ``R[y]``, the source-class distribution of ``y``.

    ``forward(features, labels)`` returns ``cotuning_loss(head(features), labels, R)``, i.e.
    ``-1/B * sum_b sum_k R[labels_b, k] * log_softmax(head(features)_b)[k]``.

    Args:
        head: the trainable copy of the source head (see :func:`kept_head`).
        relationship: ``R``, ``(C_target, K)``, rows summing to 1
            (:func:`~deltaft.cotuning.estimate_relationship`); kept as the float32 buffer
            ``relationship`` (in ``state_dict``, moved by ``.to()``).

    Raises:
        ValueError: ``R`` is not 2-D, not finite, negative, or has a row that does not sum to 1.
    """

    relationship: Tensor

    def __init__(self, head: nn.Module, relationship: Tensor) -> None:
        super().__init__(head)
        r = torch.as_tensor(relationship).detach()
        if r.dim() != 2 or r.shape[0] < 1 or r.shape[1] < 1:
            raise ValueError(
                f"The relationship must be (C_target, K_source), got {tuple(r.shape)}."
            )
        sums = r.double().sum(dim=1)
        if not bool(torch.isfinite(r).all()) or bool((r < 0).any()):
            raise ValueError("The relationship must hold finite probabilities >= 0.")
        if not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
            raise ValueError(
                "Each row of the relationship must sum to 1 (a distribution over source "
                f"classes); row sums range from {float(sums.min()):.4g} to {float(sums.max()):.4g}."
            )
        self.register_buffer("relationship", r.float().clone())

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        return cotuning_loss(self.source_logits(features), labels, self.relationship)
