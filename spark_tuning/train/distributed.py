"""All rank and world-size logic lives here; the rest of the package asks this module.

TorchDistributor starts every training process through torchrun, which sets RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT. Under torchrun a process group is always
created, even for one process, so that a one-GPU run goes through the same NCCL and DDP code as eight.
A process started without torchrun (a benchmark calling train_fn) is rank 0 of 1 with no group.

Two groups: the default one (NCCL on GPUs, gloo on CPUs) carries DDP's gradients, on the rank's device.
NCCL serves CUDA tensors only, so the small host-side exchanges (loss sums, batch counts, RNG states,
evaluation predictions) go over a second, gloo group made for them (`Context.host_group`); on CPUs the
default group is gloo already and serves both.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any, Optional

DEFAULT_TIMEOUT_MINUTES = 30


@dataclass(frozen=True)
class Context:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: str  # "cpu" or "cuda:<local rank>"
    grouped: bool = False  # a process group exists (under torchrun): collectives run, DDP wraps
    host_group: Any = None  # the group for CPU tensors and objects; None: the default group
    sharded: bool = False  # distributed.strategy fsdp: the model is sharded over the ranks (train/fsdp.py)

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.grouped

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", 1)) > 1


def init(use_gpu: bool, timeout_minutes: int = DEFAULT_TIMEOUT_MINUTES, backend: Optional[str] = None,
         strategy: str = "ddp") -> Context:
    """Join the process group: NCCL on GPUs, gloo on CPUs (`backend` overrides, e.g. "cuda:gloo" in a test
    to get a group that, like NCCL, serves no CPU tensors). `timeout_minutes` bounds every collective:
    a rank that waits longer (its peer died, or rank 0 is still writing a large checkpoint) fails."""
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
    if not launched_by_torchrun():
        return Context(rank, local_rank, world, local_world, device)
    backend = backend or ("nccl" if use_gpu else "gloo")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        # device_id binds NCCL to this rank's GPU at once (no guessing from the current device later).
        extra = {"device_id": torch.device(device)} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, timeout=timeout, **extra)
    host_group = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    ctx = Context(rank, local_rank, world, local_world, device, grouped=True, host_group=host_group,
                  sharded=strategy == "fsdp")
    if use_gpu:
        check_distinct_gpus(ctx)
    return ctx


def check_distinct_gpus(ctx: Context) -> None:
    """Two ranks on one GPU would run (slowly) until memory runs out. It happens when a reused Spark Python
    worker keeps the CUDA_VISIBLE_DEVICES of an earlier task (TorchDistributor keeps one that is set)."""
    import torch

    mine = (socket.gethostname(), str(torch.cuda.get_device_properties(ctx.device).uuid))
    seen: dict[tuple[str, str], int] = {}
    for rank, key in enumerate(gather(mine, ctx)):
        if key in seen:
            raise RuntimeError(
                f"ranks {seen[key]} and {rank} both run on GPU {key[1]} of {key[0]} (CUDA_VISIBLE_DEVICES here: "
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r}): a reused Spark Python worker kept an earlier "
                "task's CUDA_VISIBLE_DEVICES; set spark.python.worker.reuse=false in the cluster's Spark config "
                "(or spark.conf in the config), and spark.task.resource.gpu.amount to the GPUs each task owns")
        seen[key] = rank


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
    """DDP whenever there is a process group (one process included: the same path as many). A sharded
    model (fsdp.shard, before the optimizer was built) trains as it is."""
    if not ctx.is_distributed or ctx.sharded:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.local_rank] if ctx.device_type == "cuda" else None
    # gradient_as_bucket_view: gradients live in DDP's buckets, not in a second copy (one model's worth
    # of memory less per rank).
    return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)


def no_sync(model, ctx: Context, sync: bool):
    """Around an accumulation micro-step's backward: no gradient reduction there (only the last one needs it)."""
    if not ctx.is_distributed:
        return contextlib.nullcontext()
    if ctx.sharded:
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else model.no_sync()


def for_evaluation(model, ctx: Context, reshard_after_forward: bool = True):
    """The model as evaluation uses it on every rank: a sharded one gathered whole (fsdp.unsharded), so
    that ranks may run different numbers of forwards."""
    if not ctx.sharded:
        return contextlib.nullcontext(model)
    from spark_tuning.train.fsdp import unsharded

    return unsharded(model, reshard_after_forward)


def unwrap(model):
    return getattr(model, "module", model)


def gather(obj: Any, ctx: Context) -> list[Any]:
    """Every rank's `obj`, on every rank, in rank order (over the host group: pickled on the CPU)."""
    if not ctx.is_distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj, group=ctx.host_group)
    return out


def broadcast(obj: Any, ctx: Context) -> Any:
    """Rank 0's `obj` on every rank. TorchDistributor may return any rank's value: make them equal."""
    if not ctx.is_distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, group=ctx.host_group)
    return box[0]


def _all_reduce(values: list, dtype, op: str, ctx: Context) -> list:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=dtype)  # a CPU tensor: the host group serves CPU tensors
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op), group=ctx.host_group)
    return t.tolist()


def mean(values: list[float], ctx: Context) -> list[float]:
    """Element-wise mean of a few floats over ranks."""
    if not ctx.is_distributed:
        return list(values)
    import torch

    return [v / ctx.world_size for v in _all_reduce(values, torch.float64, "SUM", ctx)]


def total(values: list[float], ctx: Context) -> list[float]:
    if not ctx.is_distributed:
        return list(values)
    import torch

    return _all_reduce(values, torch.float64, "SUM", ctx)


def maximum(values: list[int], ctx: Context) -> list[int]:
    """Element-wise maximum of a few integers over ranks (e.g. each epoch's batch count)."""
    if not ctx.is_distributed:
        return list(values)
    import torch

    return _all_reduce(values, torch.int64, "MAX", ctx)
