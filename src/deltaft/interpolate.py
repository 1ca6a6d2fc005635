"""Weight-space interpolation (WiSE-FT) and BatchNorm re-estimation for the interpolated model.

Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022: the weights
``(1 - alpha) * theta_0 + alpha * theta_ft`` between the starting point ``theta_0`` and the
fine-tuned ``theta_ft``, for ``alpha`` in ``[0, 1]``, often beat both ends. The authors'
``src/wise_ft.py`` (mlfoundations/wise-ft) applies that formula to every key of two state dicts
with the same keys, for CLIP models that have no BatchNorm. Two differences here:

* integer tensors (BatchNorm's ``num_batches_tracked``) are copied from ``finetuned`` rather
  than interpolated (which would turn a counter into a float);
* an interpolated network with BatchNorm has running statistics that belong to neither end:
  :func:`recompute_batchnorm` re-estimates them on training batches.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from deltaft._utils import dtype_device

__all__ = ["interpolate_weights", "recompute_batchnorm"]

logger = logging.getLogger(__name__)

_SHOWN = 5  # how many offending names an error lists


def _names(names: Iterable[str]) -> str:
    names = sorted(names)
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(repr(n) for n in names[:_SHOWN]) + more


def _check_compatible(pretrained: Mapping[str, Tensor], finetuned: Mapping[str, Tensor]) -> None:
    only_pre, only_ft = set(pretrained) - set(finetuned), set(finetuned) - set(pretrained)
    if only_pre or only_ft:
        raise ValueError(
            "pretrained and finetuned must have the same keys; "
            f"only in pretrained: [{_names(only_pre)}]; only in finetuned: [{_names(only_ft)}]. "
            "Pass state dicts of the same architecture, with the same head."
        )
    mismatched = [k for k in finetuned if pretrained[k].shape != finetuned[k].shape]
    if mismatched:
        shown = "; ".join(
            f"{k!r}: {tuple(pretrained[k].shape)} vs {tuple(finetuned[k].shape)}"
            for k in mismatched[:_SHOWN]
        )
        more = f" and {len(mismatched) - _SHOWN} more" if len(mismatched) > _SHOWN else ""
        raise ValueError(
            f"pretrained and finetuned shapes differ (pretrained vs finetuned): {shown}{more}."
        )


def interpolate_weights(
    pretrained: Mapping[str, Tensor], finetuned: Mapping[str, Tensor], alpha: float
) -> dict[str, Tensor]:
    r"""WiSE-FT's weight-space ensemble of two state dicts (Wortsman et al., CVPR 2022).

    For every key of ``finetuned``, in its order::

        theta[key] = (1 - alpha) * pretrained[key] + alpha * finetuned[key]   (floating tensors)
        theta[key] = finetuned[key]                                           (integer / bool)

    computed in ``finetuned[key]``'s dtype on its device, without autograd. ``alpha = 0`` and
    ``alpha = 1`` return copies equal to ``pretrained`` and ``finetuned`` (the integer tensors
    always from ``finetuned``). The result is new tensors: the inputs are never modified.

    Args:
        pretrained: ``theta_0``, e.g. the pre-trained backbone with the linear-probe head.
        finetuned: ``theta_ft``, the fine-tuned state dict; same keys and shapes.
        alpha: the weight of ``finetuned``, in ``[0, 1]``.

    Returns:
        A state dict for ``model.load_state_dict``.

    Example:
        >>> theta = interpolate_weights(
        ...     {"w": torch.zeros(2), "n": torch.tensor(0)},
        ...     {"w": torch.ones(2), "n": torch.tensor(7)},
        ...     alpha=0.25,
        ... )
        >>> theta["w"], theta["n"]
        (tensor([0.2500, 0.2500]), tensor(7))
    """
    if not 0.0 <= alpha <= 1.0:  # also rejects NaN
        raise ValueError(f"alpha must be in [0, 1] (WiSE-FT's range), got {alpha}.")
    _check_compatible(pretrained, finetuned)
    theta: dict[str, Tensor] = {}
    with torch.no_grad():
        for key, ft in finetuned.items():
            if not ft.is_floating_point():
                theta[key] = ft.detach().clone()
                continue
            pre = pretrained[key].detach().to(device=ft.device, dtype=ft.dtype)
            if alpha == 0.0:  # exact copies; no 0 * inf = nan from the other end
                theta[key] = pre.clone()
            elif alpha == 1.0:
                theta[key] = ft.detach().clone()
            else:
                theta[key] = (1 - alpha) * pre + alpha * ft.detach()
    return theta


def _batch_inputs(batch: Any) -> Any:
    """The inputs of a batch: ``x`` of ``(x, y, ...)``, else the batch itself."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def recompute_batchnorm(model: nn.Module, batches: Iterable[Any], n_batches: int) -> int:
    r"""Re-estimate every BatchNorm's running statistics on up to ``n_batches`` batches.

    Each BatchNorm (with running statistics) is reset and averaged cumulatively
    (``momentum=None``) over the batches, so that after ``n`` batches::

        running_mean = 1/n * sum_b mean_b(x)          per channel, over (N, H, W) of batch b
        running_var  = 1/n * sum_b var_b(x)           unbiased (divides by N*H*W - 1)
        num_batches_tracked = n

    where ``x`` is the BatchNorm's input while the other BatchNorms normalize with their batch
    statistics. Only the BatchNorms run in training mode (dropout and the rest stay in eval);
    no gradients are recorded; every module's mode and every BatchNorm's momentum are restored
    afterwards. Like :func:`torch.optim.swa_utils.update_bn`, which instead runs the whole
    model in training mode over the whole loader. Needed after :func:`interpolate_weights`:
    the interpolated weights' activations match neither end's statistics.

    Args:
        model: the network, its weights already loaded.
        batches: an iterable of input tensors or of ``(inputs, targets, ...)`` tuples, e.g. a
            training ``DataLoader``; inputs are moved to the model's device.
        n_batches: the most batches to use (fewer when ``batches`` runs out first).

    Returns:
        How many batches were used; 0, with nothing run, when ``model`` has no BatchNorm with
        running statistics.
    """
    if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 1:
        raise ValueError(f"n_batches must be a positive integer, got {n_batches!r}.")
    norms = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not norms:
        return 0
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:  # checked before any statistic is reset
        raise ValueError("batches yielded no batch; pass the training loader to re-estimate on.")
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    _, device = dtype_device(model)
    used = 0
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: factor 1 / num_batches_tracked
            m.train()
        with torch.no_grad():
            # islice: a DataLoader is not asked for a batch beyond the last one used
            for batch in itertools.chain([first], itertools.islice(iterator, n_batches - 1)):
                model(_batch_inputs(batch).to(device))
                used += 1
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for module, training in modes.items():
            module.train(training)
    logger.debug("Re-estimated %d BatchNorm layers on %d batches.", len(norms), used)
    return used
