"""The recipes of a method spec that are stages of a run (:mod:`deltaft.app.methods`).

* ``+bss`` is a loss term of every step (:class:`~deltaft.objective.TransferObjective`'s
  ``bss``); nothing here but its settings.
* ``+lpft`` (Kumar et al., ICLR 2022): before fine-tuning, the new head is trained alone on the
  frozen backbone (the **linear probe**), and fine-tuning starts from it.
* ``+wise`` (Wortsman et al., CVPR 2022): after fine-tuning, the weights
  ``(1 - a) * theta_0 + a * theta_ft`` for each ``a`` of ``wise_alphas``, where ``theta_0`` is
  the source's backbone with the linear-probe head; BatchNorm statistics re-estimated on
  training batches for each ``a``; ``a`` chosen on the validation split; the test split scored
  once, for the chosen ``a``.

The linear probe is :func:`~deltaft.attention.train_linear_probe` with the backbone in eval
mode (its parameters and BatchNorm statistics stay bit-identical), seeded as DELTA's attention
head is (RNGs from ``(seed, "attention")``, data order from ``(seed, "attention-data")``). So
when a ``delta`` run's attention head is trained the same way (``bn frozen``, ``lp_epochs ==
attention_epochs``, ``lp_lr`` 0.01), it *is* the probe, and is kept instead of trained twice.
The probe's head is stored in every checkpoint: a resumed run never probes again.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from deltaft._utils import get_submodule
from deltaft.app.build import (
    BuiltRun,
    derived_seed,
    make_loader,
    require_validation,
    seed_everything,
)
from deltaft.app.config import TrainConfig
from deltaft.app.errors import SettingError
from deltaft.attention import train_linear_probe
from deltaft.interpolate import interpolate_weights, recompute_batchnorm

__all__ = [
    "ATTENTION_HEAD_LR",
    "LinearProbe",
    "WiseResult",
    "attention_head_reuse",
    "check_wise_validation",
    "head_state",
    "prepare_probe",
    "pretrained_state",
    "run_wise",
]

logger = logging.getLogger(__name__)

#: The learning rate DELTA's attention head trains with (the reference's, not a setting).
ATTENTION_HEAD_LR = 0.01


def check_wise_validation(cfg: TrainConfig, built: BuiltRun | None = None) -> None:
    """Refuse a ``+wise`` run without a validation split before anything trains: its mixing
    weight is chosen on validation, never on test (:func:`~deltaft.app.build.require_validation`;
    with ``built``, its splits)."""
    if cfg.spec.has("wise"):
        why = f"{{method}} {cfg.method} chooses its mixing weight on the validation split"
        require_validation(cfg, why, built.splits if built is not None else None)


# ------------------------------------------------------------------------------------------------
# LP-FT: the linear probe
# ------------------------------------------------------------------------------------------------
@dataclass
class LinearProbe:
    """The trained head of the linear probe.

    Attributes:
        head: the head module's ``state_dict`` (CPU tensors).
        how: ``"trained"``, ``"attention head"`` (DELTA's, reused) or ``"checkpoint"`` (resume).
        seconds: time spent probing (0 when reused or restored).
    """

    head: dict[str, Tensor]
    how: str
    seconds: float = 0.0

    def summary(self, cfg: TrainConfig) -> dict[str, Any]:
        """What ``summary.json`` records of the probe."""
        return {"how": self.how, "epochs": cfg.lp_epochs, "lr": cfg.lp_lr, "seconds": self.seconds}


def head_state(model: nn.Module, head: str) -> dict[str, Tensor]:
    """A CPU copy of the ``state_dict`` of ``model``'s module ``head``."""
    state = get_submodule(model, head).state_dict()
    return {key: value.detach().to("cpu", copy=True) for key, value in state.items()}


def attention_head_reuse(cfg: TrainConfig, *, estimates_attention: bool) -> str | None:
    """``None`` when the attention head that this run estimates is the linear probe it needs
    (same seeds, data, epochs, lr, and the backbone frozen), else why it is not."""
    if not estimates_attention:
        return "this run trains no attention head"
    if cfg.bn != "frozen":
        return (
            f"--bn {cfg.bn} lets the attention head's backbone follow the target data, the "
            "probe keeps it frozen"
        )
    if cfg.lp_epochs != cfg.attention_epochs:
        return f"--lp-epochs {cfg.lp_epochs} is not --attention-epochs {cfg.attention_epochs}"
    if cfg.lp_lr != ATTENTION_HEAD_LR:
        return f"--lp-lr {cfg.lp_lr:g} is not the attention head's lr {ATTENTION_HEAD_LR:g}"
    return None


def _train_probe(cfg: TrainConfig, built: BuiltRun) -> LinearProbe:
    """Train the linear probe, seeded as the attention head."""
    started = time.perf_counter()
    seed_everything(derived_seed(cfg.seed, "attention"))
    generator = torch.Generator().manual_seed(derived_seed(cfg.seed, "attention-data"))
    loader = make_loader(built.splits.train, cfg, built.device, shuffle=True, generator=generator)
    try:
        probed = train_linear_probe(
            built.source,
            loader,
            len(built.classes),
            epochs=cfg.lp_epochs,
            lr=cfg.lp_lr,
            bn="frozen",
            head=built.head,
            device=built.device,
        )
    except ValueError as error:
        raise ValueError(f"linear probe: {error}") from None
    return LinearProbe(head_state(probed, built.head), "trained", time.perf_counter() - started)


def prepare_probe(
    cfg: TrainConfig,
    built: BuiltRun,
    resume_state: Mapping[str, Any] | None,
    reused: LinearProbe | None,
    broadcast: Callable[[Any], Any],
    is_main: bool,
) -> LinearProbe | None:
    """The run's linear probe (``+lpft`` or ``+wise``), or ``None`` when the spec needs none.

    From ``resume_state`` (the checkpoint's) when resuming, else ``reused`` (the attention
    head, see :func:`attention_head_reuse`), else trained on the main process; ``broadcast``
    gives the other processes the main one's. The head is loaded into ``built.model``:
    fine-tuning starts from it, with ``+lpft`` (LP-FT) and with ``+wise`` (WiSE-FT fine-tunes
    from ``theta_0``, as its authors' code; ``+lpft`` then changes nothing).

    Raises:
        SettingError: the checkpoint to resume from does not hold the probe.
    """
    spec = cfg.spec
    if not (spec.has("lpft") or spec.has("wise")):
        return None
    probe: LinearProbe | None = None
    if resume_state is not None:
        stored = resume_state.get("probe_head")
        if not isinstance(stored, dict):
            raise SettingError(
                f"The checkpoint to resume does not hold the linear probe that {cfg.method} "
                "needs (written by another deltaft version); start a new {out}."
            )
        probe = LinearProbe(dict(stored), "checkpoint")
    elif is_main:
        probe = reused or _train_probe(cfg, built)
    probe = broadcast(probe)
    assert probe is not None  # the main process's, broadcast
    what = {
        "trained": f"trained ({cfg.lp_epochs} epochs, lr {cfg.lp_lr:g}, backbone frozen)",
        "attention head": "the attention head, reused (trained the same way)",
        "checkpoint": "restored from the checkpoint",
    }[probe.how]
    logger.info("linear probe: %s; fine-tuning starts from it.", what)
    get_submodule(built.model, built.head).load_state_dict(probe.head)
    return probe


def pretrained_state(built: BuiltRun, probe: LinearProbe) -> dict[str, Tensor]:
    """WiSE-FT's ``theta_0``: the source's backbone with the probe's head, as a CPU
    ``state_dict`` of ``built.model`` (call it before training changes the model)."""
    state = {k: v.detach().to("cpu", copy=True) for k, v in built.model.state_dict().items()}
    prefix = built.head + "."
    for key, value in probe.head.items():
        state[prefix + key] = value.clone()
    return state


# ------------------------------------------------------------------------------------------------
# WiSE-FT
# ------------------------------------------------------------------------------------------------
@dataclass
class WiseResult:
    """The outcome of :func:`run_wise`: ``summary`` (for ``summary.json``) and the chosen
    weights (``state``)."""

    summary: dict[str, Any]
    state: dict[str, Tensor]


def _key(alpha: float) -> str:
    return f"{alpha:g}"


def run_wise(
    cfg: TrainConfig,
    built: BuiltRun,
    finetuned: nn.Module,
    theta0: Mapping[str, Tensor],
    evaluate: Callable[[nn.Module, str], dict[str, float]],
    *,
    has_test: bool,
    sync: Callable[[nn.Module], None] | None = None,
) -> WiseResult:
    """WiSE-FT over ``cfg.wise_alphas``: choose on ``"val"``, score ``"test"`` once.

    For each ``a``: ``interpolate_weights(theta0, theta_ft, a)`` loaded into a copy of
    ``finetuned``; BatchNorm statistics re-estimated by
    :func:`~deltaft.interpolate.recompute_batchnorm` on the first ``cfg.wise_bn_batches``
    training batches (training transforms, the same batches for every ``a``: their order comes
    from ``(seed, "wise-bn")``); then ``evaluate(model, "val")``. The chosen ``a`` has the best
    validation accuracy (ties: the lower validation loss, then the larger ``a``). Only then is
    ``evaluate(model, "test")`` called, once, with the chosen weights (when ``has_test``).
    ``finetuned`` is not modified. ``sync`` (under ``torchrun``) makes the re-estimated
    statistics the main process's.
    """
    theta_ft = {k: v.detach().clone() for k, v in finetuned.state_dict().items()}
    model = copy.deepcopy(finetuned)
    generator = torch.Generator()
    loader = make_loader(built.splits.train, cfg, built.device, shuffle=True, generator=generator)
    val: dict[str, dict[str, float]] = {}
    best: tuple[tuple[float, float, float], float, dict[str, Tensor]] | None = None
    bn_batches = 0
    for alpha in cfg.wise_alphas:
        model.load_state_dict(interpolate_weights(theta0, theta_ft, alpha))
        generator.manual_seed(derived_seed(cfg.seed, "wise-bn"))
        bn_batches = recompute_batchnorm(model, loader, cfg.wise_bn_batches)
        if sync is not None:
            sync(model)
        val[_key(alpha)] = evaluate(model, "val")
        rank = (val[_key(alpha)]["acc"], -val[_key(alpha)]["loss"], alpha)
        if best is None or rank > best[0]:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best = (rank, alpha, state)
    assert best is not None  # wise_alphas is never empty (TrainConfig)
    _, chosen, state = best
    if bn_batches:
        logger.info(
            "WiSE-FT: BatchNorm statistics re-estimated on %d training batches per weight.",
            bn_batches,
        )
    line = ", ".join(f"a={key} {100 * v['acc']:.2f} %" for key, v in val.items())
    logger.info("WiSE-FT validation accuracy: %s; chosen a=%s.", line, _key(chosen))
    test: dict[str, float] = {}
    if has_test:
        model.load_state_dict(state)
        test = evaluate(model, "test")
    summary = {
        "alphas": list(cfg.wise_alphas),
        "val_accuracy": {key: v["acc"] for key, v in val.items()},
        "val_loss": {key: v["loss"] for key, v in val.items()},
        "alpha": chosen,
        "test_accuracy": test.get("acc"),
        "test_loss": test.get("loss"),
        "bn_batches": bn_batches,
    }
    return WiseResult(summary, state)
