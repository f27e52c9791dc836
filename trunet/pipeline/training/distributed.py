"""Data-parallel training through ``torchrun``: process group, device, and the few collectives we need.

``torchrun --nproc_per_node=N -m trunet train ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them and joins the group (NCCL when
CUDA is available, Gloo on CPU). Without them it returns a single-process :class:`DistContext` on which
every collective is a no-op, so the trainer has one code path.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

__all__ = [
    "DistContext",
    "init_distributed",
    "distributed_context",
    "cleanup",
    "barrier",
    "all_reduce_mean",
    "all_reduce_sum",
    "all_gather_objects",
    "broadcast_object",
    "pick_device",
    "launcher_world_size",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands.

    Attributes:
        rank / world_size / local_rank: from torchrun (0 / 1 / 0 for a single process).
        device: the device this process trains on (``cuda:<local_rank>`` under DDP on GPUs).
        backend: ``"nccl"``, ``"gloo"`` or ``None`` (single process, no process group).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that logs, validates the shown cases and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None and self.world_size > 1


def pick_device(local_rank: int = 0) -> torch.device:
    """``cuda:<local_rank>`` when CUDA is available, else the CPU (chosen at run time, never hard-coded)."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def launcher_world_size() -> int:
    """Processes started together by a launcher that is not torchrun (Slurm ``srun``, MPI), else 1.

    Lets ``trunet train`` warn when N processes run but ``WORLD_SIZE`` says 1: they would train N
    independent copies into the same run folder.
    """
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 1:
            return int(value)
    return 1


def init_distributed(timeout_minutes: float = 30.0) -> DistContext:
    """Join the torchrun process group if there is one.

    Args:
        timeout_minutes: collective timeout (validation runs between collectives, so keep it generous).

    Returns:
        a :class:`DistContext`; ``backend`` is None for a single process.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(local_rank)
    if world_size <= 1:
        return DistContext(rank=0, world_size=1, local_rank=local_rank, device=device, backend=None)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(minutes=timeout_minutes)}
        if device.type == "cuda":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    logger.debug("joined process group: rank %d/%d (local %d) on %s via %s", rank, world_size, local_rank,
                 device, backend)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                       backend=backend)


def cleanup(ctx: DistContext) -> None:
    """Leave the process group (no-op for a single process)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_context(timeout_minutes: float = 30.0) -> Iterator[DistContext]:
    """``with distributed_context() as ctx:`` joins the group (if any) and always leaves it."""
    ctx = init_distributed(timeout_minutes)
    try:
        yield ctx
    finally:
        cleanup(ctx)


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op for a single process)."""
    if ctx.distributed:
        if ctx.backend == "nccl":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place, and return it (unchanged for a single process)."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(value: torch.Tensor | float, ctx: DistContext) -> torch.Tensor | float:
    """Mean of ``value`` over ranks. A float comes back as a float, a tensor as a new tensor."""
    if not ctx.distributed:
        return value
    if isinstance(value, torch.Tensor):
        out = value.detach().clone().to(ctx.device)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / ctx.world_size
    out = torch.tensor([float(value)], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return float(out.item()) / ctx.world_size


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` for a single process."""
    if not ctx.distributed:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself for a single process)."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
