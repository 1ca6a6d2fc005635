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

The package, by concern:

* :mod:`~deltaft.attention.scores`: :func:`channel_removal_scores` (``exact``, ``reference`` and
  ``taylor`` methods) and :func:`attention_from_scores`.
* :mod:`~deltaft.attention.exact` and :mod:`~deltaft.attention.replay`: the ``exact`` method, the
  fx prefix-reuse engine and its fallback to batched full forwards (internal).
* :mod:`~deltaft.attention.value`: the :class:`ChannelAttention` value object and its file format.
* :mod:`~deltaft.attention.fingerprint`: :func:`model_fingerprint`, :func:`data_fingerprint`.
* :mod:`~deltaft.attention.estimate`: :func:`estimate_channel_attention`, the whole procedure,
  and :func:`train_linear_probe`, its first step (LP-FT's linear probe too).
"""

from deltaft.attention._common import Method
from deltaft.attention.estimate import (
    BatchNormMode,
    estimate_channel_attention,
    train_linear_probe,
)
from deltaft.attention.fingerprint import data_fingerprint, model_fingerprint
from deltaft.attention.scores import attention_from_scores, channel_removal_scores
from deltaft.attention.value import ChannelAttention

__all__ = [
    "BatchNormMode",
    "ChannelAttention",
    "Method",
    "attention_from_scores",
    "channel_removal_scores",
    "data_fingerprint",
    "estimate_channel_attention",
    "model_fingerprint",
    "train_linear_probe",
]
