"""Data-parallel training under ``torchrun``: process group, samplers, DDP and collectives.

``torchrun --nproc_per_node N -m deltaft train ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR/PORT`` set. :func:`init_from_env` joins them
(NCCL on CUDA, gloo on CPU); without those variables everything here is a no-op on a single
process, so the same code path trains on one device.

What each process does:

* every process reads the data and builds the model; the training set is split between them
  with a ``DistributedSampler`` (``batch_size`` is per process);
* the channel attention is estimated once, on rank 0, and broadcast to the others;
* :func:`wrap` puts the :class:`~deltaft.objective.TransferObjective` in
  ``DistributedDataParallel``: gradients of the trainable model are averaged, the frozen source
  (``requires_grad=False``) takes no part in the gradient reduction;
* evaluation splits the images between processes without padding and sums the counts;
* only rank 0 writes files and prints progress.

A process that dies or hangs must not leave the others waiting for ever: every collective
(and joining the group) gives up after ``DELTAFT_DIST_TIMEOUT`` seconds (default
:data:`DEFAULT_TIMEOUT_S`, 30 minutes: long enough for rank 0 to estimate the attention while
the others wait) and the waiting process exits with an error. A process that dies is usually
noticed at once, when its connections close.
"""

from __future__ import annotations

import datetime
import inspect
import logging
import os
from collections.abc import Iterator, Sized
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Sampler

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistInfo",
    "ShardSampler",
    "current",
    "init_from_env",
    "shutdown",
    "wrap",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 1800
TIMEOUT_ENV = "DELTAFT_DIST_TIMEOUT"


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (a single process when ``world_size == 1``).

    Attributes:
        rank: global rank.
        world_size: number of processes.
        local_rank: rank on this machine (its GPU index).
        backend: ``nccl``, ``gloo`` or ``""`` when not distributed.
        device: where collectives' tensors must live (``cuda:LOCAL_RANK`` for NCCL).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        """Whether this is one of several processes."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and logs progress."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every process (a no-op alone)."""
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over processes; returns a new tensor on ``tensor``'s device."""
        if not self.enabled:
            return tensor
        work = tensor.to(self.device, copy=True)
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        return work.to(tensor.device)

    def broadcast_object(self, obj: T | None, src: int = 0) -> T:
        """``obj`` from rank ``src`` on every process (pickled; ``obj`` is ignored elsewhere)."""
        if not self.enabled:
            if obj is None:
                raise ValueError("broadcast_object needs an object on a single process.")
            return obj
        box: list[Any] = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=self.device)
        return box[0]

    def broadcast_buffers(self, module: nn.Module, src: int = 0) -> None:
        """Copy ``module``'s floating-point buffers (BatchNorm statistics) from rank ``src``.

        DDP here does not broadcast buffers at every step (that would also send the frozen
        source's and L2-SP's reference copies); this makes the running statistics identical on
        every process before evaluating or saving.
        """
        if not self.enabled:
            return
        for buffer in module.buffers():
            if buffer.is_floating_point() or buffer.dtype == torch.long:
                work = buffer.detach().to(self.device)
                dist.broadcast(work, src=src)
                buffer.copy_(work.to(buffer.device))


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def init_from_env(device: str = "auto") -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment.

    Uses NCCL when CUDA is available and ``device`` is not ``cpu`` (each process on
    ``cuda:LOCAL_RANK``), gloo otherwise. Without ``WORLD_SIZE > 1`` nothing happens. Joining
    and every collective time out after ``DELTAFT_DIST_TIMEOUT`` seconds (default
    :data:`DEFAULT_TIMEOUT_S`).

    Returns:
        This process's :class:`DistInfo`.

    Raises:
        ValueError: ``DELTAFT_DIST_TIMEOUT`` is not a positive number of seconds.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() and not device.startswith("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=_timeout())
    info = current()
    logger.debug(
        "process %d (RANK %d) of %d joined (%s)", info.rank, rank, info.world_size, info.backend
    )
    return info


def _timeout() -> datetime.timedelta:
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        seconds = float(text) if text else float(DEFAULT_TIMEOUT_S)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(
            f"{TIMEOUT_ENV}={text!r}: expected a positive number of seconds, e.g. "
            f"{TIMEOUT_ENV}={DEFAULT_TIMEOUT_S}."
        )
    return datetime.timedelta(seconds=seconds)


def current() -> DistInfo:
    """The :class:`DistInfo` of the initialised process group, or a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    backend = str(dist.get_backend())
    local_rank = _env_int("LOCAL_RANK", 0)
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        backend=backend,
        device=device,
    )


def shutdown() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(objective: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(objective)`` when distributed, else ``objective`` itself.

    The whole objective is wrapped, so its forward (target model, hooks, frozen source,
    regularizers) runs unchanged; only parameters with ``requires_grad`` (the target model)
    take part in the gradient all-reduce.
    """
    if not info.enabled:
        return objective
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    # No buffer broadcast at every forward (see DistInfo.broadcast_buffers); the parameters and
    # buffers are still synchronised once, when wrapping. Newer torch renamed the option.
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    option = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    sync: dict[str, Any] = {option: False}
    return DistributedDataParallel(objective, device_ids=device_ids, **sync)


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` of a dataset, in order, without padding.

    For evaluation: every image is seen exactly once over all processes, so summed counts give
    exact metrics (a ``DistributedSampler`` would repeat images to even out the shards).
    """

    def __init__(self, dataset: Sized, info: DistInfo) -> None:
        self.indices = list(range(info.rank, len(dataset), info.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
