"""Sharded data parallel with PyTorch's FSDP2 (`fully_shard`): the model sharded over the ranks, its
evaluation, its checkpoints and its export. Asked for by `distributed.strategy: fsdp`; `distributed.wrap`
is the DDP side. The loop calls these; model code knows nothing of them.

Each transformer block (the classes a model lists in `_no_split_modules`, or `distributed.fsdp.block_class`)
becomes one FSDP unit and the root holds the rest (embeddings, head). A rank keeps 1/world of every
parameter, its gradient and its AdamW state; a unit's full parameters exist only while it computes
(all-gathered before, freed after, unless `reshard_after_forward: false` keeps them from forward to backward).
Memory per parameter and rank, AdamW in fp32 master weights: DDP 16 bytes (4 weights + 4 gradients + 8
optimizer); FSDP 16 / world plus the units being computed.

Loading: with several processes only rank 0 reads the pretrained weights; the other ranks build the model
on the meta device and receive their shards from rank 0 (`load_from_rank0`), so no rank but the first ever
holds a full copy (CPU offload excepted: there every rank loads, as DDP does).

Mixed precision: the sharded master weights stay fp32; a unit is all-gathered in the run's half precision
(`MixedPrecisionPolicy.param_dtype`) and its gradients are reduce-scattered in `distributed.fsdp.reduce_dtype`
(fp32 by default: summing many ranks' bf16 gradients loses bits).

Evaluation runs on every rank over shards of different lengths, which FSDP's per-unit all-gathers cannot
(every rank must run the same forwards): `unsharded` gathers every unit once, and forwards then need no
collective. That holds one full copy of the weights, in the half precision, per rank while it lasts.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Optional

log = logging.getLogger("spark_tuning.train")

DCP_FOLDER = "dcp"  # inside a checkpoint folder: torch.distributed.checkpoint's shards and .metadata
REDUCE_DTYPES = ("fp32", "bf16", "fp16")


def block_classes(model, configured: Optional[list[str]] = None) -> list[str]:
    """The class names of the blocks to shard one by one: `configured`, else the model's
    `_no_split_modules` (what transformers itself keeps whole when it splits a model), those present."""
    names = list(configured or [])
    if not names:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        names = list(getattr(inner, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in model.modules()}
    return [n for n in names if n in present]


def blocks_problem(model, configured: Optional[list[str]]) -> Optional[str]:
    """Why `model` cannot be sharded block by block (None: it can): what the user must set."""
    found = block_classes(model, configured)
    if found:
        return None
    present = sorted({type(m).__name__ for m in model.modules() if "Layer" in type(m).__name__
                      or "Block" in type(m).__name__})
    if configured:
        return (f"distributed.fsdp.block_class = {configured!r} names no module of {type(model).__name__}: "
                f"name its transformer block class{' (modules here: ' + ', '.join(present[:8]) + ')' if present else ''}")
    return (f"distributed.strategy = 'fsdp' cannot find the transformer block class of {type(model).__name__} "
            "(the model lists no _no_split_modules): set distributed.fsdp.block_class to it"
            f"{' (one of: ' + ', '.join(present[:8]) + ')' if present else ''}")


def _dtype(name: Optional[str]):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(name or "")


def shard(model, fsdp_cfg, precision: str, device: str):
    """`fully_shard` on every block, then on the root, in place; returns the model (an FSDPModule now).
    Build the optimizer after this: its parameters are the shards (DTensors)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    names = set(block_classes(model, fsdp_cfg.block_class))
    half = _dtype(precision) if precision in ("bf16", "fp16") else None
    mp = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=_dtype(fsdp_cfg.reduce_dtype))
    offload = CPUOffloadPolicy() if fsdp_cfg.cpu_offload and device.startswith("cuda") else OffloadPolicy()
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    for block in blocks:
        fully_shard(block, mp_policy=mp, offload_policy=offload, reshard_after_forward=fsdp_cfg.reshard_after_forward)
    # The root's parameters (embeddings, final norm, head) are needed first and last: never resharded
    # in between, as FSDP does for the root anyway.
    fully_shard(model, mp_policy=mp, offload_policy=offload, reshard_after_forward=False)
    log.info("FSDP: %d %s blocks sharded, then the root; params in %s, gradients reduced in %s%s", len(blocks),
             "/".join(sorted(names)), precision if half else "fp32", fsdp_cfg.reduce_dtype,
             ", parameters and optimizer state offloaded to CPU" if isinstance(offload, CPUOffloadPolicy) else "")
    return model


def load_from_rank0(model, full: Optional[dict], device: str, rank: int) -> None:
    """Rank 0's weights into every rank's shards, after `shard`: rank 0 built the model with its pretrained
    weights (`full`: its state dict, taken before sharding), the other ranks on the meta device (no memory,
    nothing read); each tensor is broadcast from rank 0 and every rank keeps its own shard of it. Buffers,
    which a state dict lacks where they are not persistent (e.g. rotary frequencies), are broadcast whole.
    A collective."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if rank != 0:
        model.to_empty(device=device)  # storage for this rank's shards and the buffers, filled below
    set_model_state_dict(model, full if rank == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def unsharded(model, reshard_after_forward: bool):
    """Every unit's full parameters on this rank for the duration: forwards (evaluation on shards of any
    length, generation on one rank) then run without collectives. Entered and left on every rank."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(reshard_after_forward and unit is not model, recurse=False)


def full_state_dict(model) -> dict:
    """The whole model's state as plain CPU tensors on rank 0 (an empty dict elsewhere); every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(folder: str, model, optimizer) -> None:
    """Every rank writes its own shards of the weights and the optimizer state into `folder`/dcp (rank 0 the
    .metadata, last); a collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(folder, DCP_FOLDER))


def has_sharded(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, DCP_FOLDER, ".metadata"))


def load_sharded(folder: str, model, optimizer) -> None:
    """The weights and optimizer state of a sharded checkpoint into `model` (sharded or not, on any number of
    processes: torch.distributed.checkpoint reshards on load) and `optimizer` (whose states are created first)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=os.path.join(folder, DCP_FOLDER))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
