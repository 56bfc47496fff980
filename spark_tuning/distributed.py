"""All rank and world-size logic lives here; the rest of the package asks this module.

TorchDistributor starts every training process through torchrun, which sets RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT. A single process (no torchrun) is rank 0 of 1.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Context:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: str  # "cpu" or "cuda:<local rank>"

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init(use_gpu: bool, timeout_s: int = 1800) -> Context:
    """Join the process group: NCCL on GPUs, gloo on CPUs."""
    import torch
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if use_gpu:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    else:
        device = "cpu"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_gpu else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return Context(rank, local_rank, world, local_world, device)


def shutdown(ctx: Context) -> None:
    import torch.distributed as dist

    if ctx.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def threads_per_process(ctx: Context) -> int:
    """Split the machine's cores between the processes on it. OMP_NUM_THREADS, where set, already says
    how many cores this process may use: torchrun sets 1 when it starts several processes, and Spark sets
    the executor's cores for its Python workers (whose environment the training processes inherit)."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    return max(1, (os.cpu_count() or 1) // ctx.local_world_size)


def wrap(model, ctx: Context):
    if not ctx.is_distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.local_rank] if ctx.device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model):
    return getattr(model, "module", model)


def gather(obj: Any, ctx: Context) -> list[Any]:
    """Every rank's `obj`, on every rank, in rank order."""
    if not ctx.is_distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any, ctx: Context) -> Any:
    """Rank 0's `obj` on every rank. TorchDistributor may return any rank's value: make them equal."""
    if not ctx.is_distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean(values: list[float], ctx: Context) -> list[float]:
    """Element-wise mean of a few floats over ranks."""
    if not ctx.is_distributed:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / ctx.world_size).tolist()


def total(values: list[float], ctx: Context) -> list[float]:
    if not ctx.is_distributed:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def maximum(values: list[int], ctx: Context) -> list[int]:
    """Element-wise maximum of a few integers over ranks (e.g. each epoch's batch count)."""
    if not ctx.is_distributed:
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()
