"""Co-Tuning: the category relationship ``p(y_source | y_target)`` and the Co-Tuning loss.

You et al., "Co-Tuning for Transfer Learning" (NeurIPS 2020), reference code thuml/CoTuning
(``module/relationship_learning.py``, ``train.py``) and the peer library's
``tllib/regularization/co_tuning.py``. The pre-trained network keeps its source classifier head;
each target class ``c`` gets a distribution ``R[c]`` over the ``K`` source classes, learned once
from the source network's predictions on the target training images, and fine-tuning also trains
the kept source head to predict ``R[y]`` for an image of class ``y`` (:func:`cotuning_loss`).

Two estimators of ``R`` (shape ``(C_target, C_source)``, rows sum to 1), both from the paper:

* ``"direct"``: the average source prediction of each target class (the peer library's only one).
* ``"reverse"``: a calibrated multinomial logistic regression ``p(y_target | y_source)`` turned
  around with Bayes' rule. It is the default of the authors' ``train.py`` and of deltaft.

Source predictions are ``softmax(logit_scale * logits)``; the authors hard-code
``logit_scale = 0.8840456604957581`` (:data:`RESNET50_LOGIT_SCALE`, a calibration of their
ImageNet ResNet-50), deltaft defaults to 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "AUTHORS_C_GRID",
    "RESNET50_LOGIT_SCALE",
    "cotuning_loss",
    "direct_relationship",
    "estimate_relationship",
    "reverse_relationship",
]

RelationshipMethod = Literal["direct", "reverse"]

#: The authors' logit scale for their ImageNet ResNet-50 (thuml/CoTuning, both estimators).
RESNET50_LOGIT_SCALE = 0.8840456604957581

#: The inverse L2 strengths the authors' reverse estimator tries, in their order.
AUTHORS_C_GRID: tuple[float, ...] = (
    *(1e4, 3e3, 1e3, 3e2, 1e2, 3e1, 1e1, 3.0, 1.0),
    *(3e-1, 1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4),
)


def _check_logits_labels(logits: Tensor, labels: Tensor, num_classes: int, what: str) -> None:
    if logits.dim() != 2 or labels.dim() != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Expected {what} source logits (N, K) and labels (N,) with the same N, got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}."
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{what.capitalize()} labels must be in [0, {num_classes}), got values from "
            f"{int(labels.min())} to {int(labels.max())}."
        )
    counts = torch.bincount(labels.long(), minlength=num_classes)
    empty = [c for c in range(num_classes) if counts[c] == 0]
    if empty:
        raise ValueError(
            f"Target classes {empty[:10]} have no {what} samples; every class needs at least one "
            "image to get a relationship."
        )


def _probabilities(logits: Tensor, logit_scale: float) -> Tensor:
    if isinstance(logit_scale, bool) or not 0 < logit_scale < float("inf"):
        raise ValueError(f"logit_scale must be a finite number > 0, got {logit_scale!r}.")
    return torch.softmax(logits.detach().double() * logit_scale, dim=1)  # (N, K)


def direct_relationship(
    source_logits: Tensor, labels: Tensor, num_classes: int, logit_scale: float = 1.0
) -> Tensor:
    r"""The direct estimator: ``R[c] = mean_{i : labels[i] = c} softmax(logit_scale * z_i)``.

    Args:
        source_logits: the source network's logits on the target images, ``(N, K)``.
        labels: their target classes, ``(N,)``, in ``[0, num_classes)``; every class present.
        num_classes: ``C``, the number of target classes.
        logit_scale: multiplies the logits before the softmax.

    Returns:
        ``R``, float64 of shape ``(C, K)``; each row sums to 1.

    Example:
        >>> z = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]))
        >>> direct_relationship(z, torch.tensor([0, 0, 1]), num_classes=2)
        tensor([[0.7000, 0.3000],
                [0.2000, 0.8000]], dtype=torch.float64)
    """
    _check_logits_labels(source_logits, labels, num_classes, "training")
    probs = _probabilities(source_logits, logit_scale)  # (N, K)
    one_hot = torch.nn.functional.one_hot(labels.long(), num_classes).to(probs)  # (N, C)
    sums = one_hot.T @ probs  # (C, K)
    return sums / one_hot.sum(dim=0)[:, None]


def _fit_logistic_regression(x: Tensor, y: Tensor, num_classes: int, c: float) -> Tensor:
    """Multinomial logistic regression without intercept, as scikit-learn's ``C`` defines it.

    Minimises ``1/2 * ||W||_F^2 + c * sum_i CE(W x_i, y_i)`` (divided by ``c * N`` for
    conditioning), ``W`` of shape ``(C, K)``, with float64 L-BFGS to convergence.
    """
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight],
        lr=1.0,
        max_iter=500,
        tolerance_grad=1e-8,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    ridge = 0.5 / (c * x.shape[0])

    def objective() -> Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight.T, y) + ridge * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    return weight.detach()


def _calibrate(logits: Tensor, labels: Tensor) -> float:
    """The temperature-like scale ``s`` minimising ``mean_i CE(s * logits_i, labels_i)``."""
    scale = torch.ones((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [scale], max_iter=200, tolerance_grad=1e-12, line_search_fn="strong_wolfe"
    )

    def objective() -> Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits * scale, labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    return float(scale.detach())


def reverse_relationship(
    train_logits: Tensor,
    train_labels: Tensor,
    val_logits: Tensor,
    val_labels: Tensor,
    num_classes: int,
    logit_scale: float = 1.0,
    c_grid: Sequence[float] = AUTHORS_C_GRID,
) -> Tensor:
    r"""The reverse estimator (the authors' default): Bayes' rule on a calibrated classifier.

    With ``P = softmax(logit_scale * logits)`` (``(N, K)``)::

        W   = argmin 1/2 ||W||^2 + C * sum_i CE(W P_i, y_i)   fitted on the training split, for
              each C in c_grid; kept: the first C with the best validation accuracy
        s   = argmin_s mean_i CE(s * W P_i, y_i)              on the validation split
        Q   = softmax(s * W^T, dim=1)                         (K, C): p(y_target | y_source = k)
        m   = mean of P over training and validation rows     (K,):   p(y_source)
        R[c, k] = Q[k, c] * m[k] / sum_k' Q[k', c] * m[k']    (C, K): p(y_source | y_target)

    ``Q[k]`` is the classifier's answer for a one-hot source prediction ``e_k``. The authors fit
    with scikit-learn (``lbfgs``, 100 iterations) and calibrate with float32 L-BFGS; here both
    are float64 L-BFGS run to convergence, so numbers agree to the solvers' tolerance.

    Args:
        train_logits: source logits on the target training images, ``(N, K)``.
        train_labels: their classes ``(N,)``; every class present.
        val_logits: source logits on held-out target images, ``(M, K)``.
        val_labels: their classes ``(M,)``; every class present.
        num_classes: ``C``, the number of target classes.
        logit_scale: multiplies the logits before the softmax.
        c_grid: inverse L2 strengths to try, in order (ties keep the first).

    Returns:
        ``R``, float64 of shape ``(C, K)``; each row sums to 1.
    """
    _check_logits_labels(train_logits, train_labels, num_classes, "training")
    _check_logits_labels(val_logits, val_labels, num_classes, "validation")
    if val_logits.shape[1] != train_logits.shape[1]:
        raise ValueError(
            f"Training logits have {train_logits.shape[1]} source classes, validation logits "
            f"{val_logits.shape[1]}; both must come from the same source head."
        )
    if not c_grid or any(not 0 < c < float("inf") for c in c_grid):
        raise ValueError(f"c_grid must be non-empty with finite values > 0, got {list(c_grid)}.")
    p_train = _probabilities(train_logits, logit_scale)  # (N, K)
    p_val = _probabilities(val_logits, logit_scale)  # (M, K)
    y_train, y_val = train_labels.long(), val_labels.long()
    best_acc, best_w = -1.0, p_train.new_zeros(())
    for c in c_grid:
        w = _fit_logistic_regression(p_train, y_train, num_classes, c)  # (C, K)
        acc = float(((p_val @ w.T).argmax(dim=1) == y_val).double().mean())
        if acc > best_acc:
            best_acc, best_w = acc, w
    scale = _calibrate(p_val @ best_w.T, y_val)
    target_given_source = torch.softmax(best_w.T * scale, dim=1)  # (K, C)
    source_marginal = torch.cat([p_train, p_val]).mean(dim=0)  # (K,)
    joint = (target_given_source * source_marginal[:, None]).T  # (C, K)
    return joint / joint.sum(dim=1, keepdim=True)


def estimate_relationship(
    train_logits: Tensor,
    train_labels: Tensor,
    num_classes: int,
    method: RelationshipMethod = "reverse",
    val_logits: Tensor | None = None,
    val_labels: Tensor | None = None,
    logit_scale: float = 1.0,
) -> Tensor:
    """``p(y_source | y_target)`` by ``method``: ``"reverse"`` (authors' default) or ``"direct"``.

    ``"reverse"`` needs the held-out ``val_logits`` and ``val_labels``; ``"direct"`` averages over
    the training rows and, when given, the validation rows too (as the authors' code does).
    Returns a float64 ``(C_target, C_source)`` tensor whose rows sum to 1.
    """
    if (val_logits is None) != (val_labels is None):
        raise ValueError("Give both val_logits and val_labels, or neither.")
    if method == "reverse":
        if val_logits is None or val_labels is None:
            raise ValueError(
                "The 'reverse' relationship picks its regularization and calibration on held-out "
                "images: pass val_logits and val_labels, or use method='direct'."
            )
        return reverse_relationship(
            train_logits, train_labels, val_logits, val_labels, num_classes, logit_scale
        )
    if method == "direct":
        if val_logits is not None and val_labels is not None:
            train_logits = torch.cat([train_logits, val_logits])
            train_labels = torch.cat([train_labels, val_labels])
        return direct_relationship(train_logits, train_labels, num_classes, logit_scale)
    raise ValueError(f"method must be 'reverse' or 'direct', got {method!r}.")


def cotuning_loss(source_logits: Tensor, labels: Tensor, relationship: Tensor) -> Tensor:
    r"""Cross-entropy of the kept source head against the relationship-mapped target labels.

    ::

        loss = -1/B * sum_b sum_k R[labels[b], k] * log_softmax(source_logits[b])[k]

    ``R`` is detached and cast to the logits' dtype and device; the authors weight this term by
    ``trade_off = 2.3`` next to the target cross-entropy.

    Args:
        source_logits: the fine-tuned network's source-head logits, ``(B, K)``.
        labels: target classes ``(B,)``.
        relationship: ``R``, ``(C_target, K)``, from :func:`estimate_relationship`.

    Example:
        >>> r = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
        >>> cotuning_loss(torch.zeros(2, 2), torch.tensor([0, 1]), r)  # log 2 for both rows
        tensor(0.6931)
    """
    if relationship.dim() != 2 or source_logits.dim() != 2 or labels.dim() != 1:
        raise ValueError(
            "Expected source logits (B, K), labels (B,) and a relationship (C_target, K), got "
            f"{tuple(source_logits.shape)}, {tuple(labels.shape)} and "
            f"{tuple(relationship.shape)}."
        )
    if source_logits.shape[1] != relationship.shape[1] or source_logits.shape[0] != len(labels):
        raise ValueError(
            f"Source logits {tuple(source_logits.shape)} must match the labels' batch "
            f"({len(labels)}) and the relationship's {relationship.shape[1]} source classes."
        )
    if source_logits.shape[0] == 0:
        raise ValueError("cotuning_loss needs a non-empty batch; got B = 0.")
    if int(labels.min()) < 0 or int(labels.max()) >= relationship.shape[0]:
        raise ValueError(
            f"Labels must be in [0, {relationship.shape[0]}), the relationship's target classes; "
            f"got values from {int(labels.min())} to {int(labels.max())}."
        )
    targets = relationship.detach().to(source_logits)[labels.long()]  # (B, K)
    log_q = torch.log_softmax(source_logits, dim=1)  # (B, K)
    return -(targets * log_q).sum(dim=1).mean()
