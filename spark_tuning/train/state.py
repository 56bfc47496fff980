"""What a checkpoint saves and a resume restores, whole: the loop's progress (`TrainState`), the weights,
the optimizer, schedule and loss-scale states, and every rank's RNG states. No distributed code: the
loop gathers the RNG states and rank 0 calls `save`; a sharded (fsdp) run's ranks all call `save_sharded`,
whose collectives are train/fsdp.py's."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

log = logging.getLogger("spark_tuning.train")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch under way
    micro: int = 0  # batches of that epoch already done
    history: list = field(default_factory=list)  # one record per log window
    epochs: list = field(default_factory=list)  # one record per evaluation
    totals: dict = field(default_factory=lambda: {"tokens": 0, "padded": 0, "seconds": 0.0})
    world_size: int = 1
    # train.early_stopping / keep_best: the best evaluation so far (of early_stopping.metric), and how many
    # evaluations since have not beaten it; stopped: training ended early at `step`.
    best_step: Optional[int] = None
    best_value: Optional[float] = None
    bad_evals: int = 0
    stopped: bool = False
    resumed: bool = False  # not saved: whether this run began from a checkpoint

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("resumed")
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrainState":
        names = {f.name for f in dataclasses.fields(cls)} - {"resumed"}
        return cls(**{k: v for k, v in raw.items() if k in names}, resumed=True)


def rng_state(device: str) -> dict:
    """This rank's random state: the CPU generator, and the GPU's (dropout masks on a GPU come from it)."""
    import torch

    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.startswith("cuda") else None}


def set_rng_state(state, device: str) -> None:
    import torch

    if isinstance(state, torch.Tensor):  # a checkpoint written before GPU states were kept
        state = {"cpu": state, "cuda": None}
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and device.startswith("cuda"):
        torch.cuda.set_rng_state(state["cuda"], device)


def save(folder: str, state: TrainState, model, optimizer, scheduler, scaler, rng: list, keep_last: int,
         spare: Optional[int] = None) -> str:
    from spark_tuning.train import checkpoint

    return checkpoint.save(folder, state.step, model, optimizer, scheduler, rng, state.to_dict(), keep_last,
                           scaler=scaler.state_dict() if scaler.is_enabled() else None, spare=spare)


def save_sharded(folder: str, state: TrainState, model, optimizer, scheduler, scaler, rng: list, keep_last: int,
                 ctx, spare: Optional[int] = None) -> str:
    """A sharded (fsdp) checkpoint, on every rank: each writes its shards of the weights and the optimizer
    into one temporary folder (rank 0 names it), then rank 0 adds the rest and renames it into place."""
    from spark_tuning.train import checkpoint, distributed, fsdp

    tmp = distributed.broadcast(checkpoint.begin(folder, state.step) if ctx.is_rank_zero else None, ctx)
    fsdp.save_sharded(tmp, model, optimizer)  # returns once every rank's shards and the metadata are written
    path = None
    if ctx.is_rank_zero:
        path = checkpoint.finish(folder, tmp, state.step, {"scheduler": scheduler.state_dict(), "rng": rng,
                                                           "scaler": scaler.state_dict() if scaler.is_enabled() else None},
                                 state.to_dict(), keep_last, spare)
    return distributed.broadcast(path, ctx)


def load_weights_only(path: str, model, optimizer) -> None:
    """The weights of checkpoint `path` into `model` (train.keep_best, at the end: the best model back); a
    collective for a sharded checkpoint (which brings its optimizer state along: training is over)."""
    from spark_tuning.train import checkpoint, fsdp

    if fsdp.has_sharded(path):
        fsdp.load_sharded(path, model, optimizer)
    else:
        checkpoint.load_weights(path, model)


def restore(path: Optional[str], model, optimizer, scheduler, scaler, rank: int, world_size: int,
            device: str) -> TrainState:
    """The state of checkpoint `path` loaded into the model, optimizer, scaler and this rank's RNGs (before
    DDP wraps the model; after FSDP shards it); a fresh TrainState when `path` is None. Optimizer states load
    onto the CPU first and go to the parameters' device. A checkpoint of another number of processes resumes
    too: a sharded one is resharded on load, and the interrupted epoch goes on where as many rows were seen."""
    from spark_tuning.train import checkpoint, fsdp

    if not path:
        return TrainState(world_size=world_size)
    state = TrainState.from_dict(checkpoint.load_state(path))
    training = checkpoint.load_training_state(path)
    if fsdp.has_sharded(path):  # a collective: every rank reads the shards it needs
        fsdp.load_sharded(path, model, optimizer)
    elif fsdp.is_sharded(model):
        raise RuntimeError(f"checkpoint {path} holds whole weights (distributed.strategy: ddp); an fsdp run does "
                           "not resume it: resume with distributed.strategy: ddp")
    else:
        checkpoint.load_weights(path, model)
        optimizer.load_state_dict(training["optimizer"])
    scheduler.load_state_dict(training["scheduler"])
    if training.get("scaler"):
        scaler.load_state_dict(training["scaler"])
    rng = training["rng"]
    set_rng_state(rng[rank % len(rng)], device)  # more processes than wrote it: some start from the same state
    if state.world_size != world_size:
        before = state.micro
        state.micro = round(state.micro * state.world_size / world_size)  # the same rows seen, over the new ranks
        if rank == 0:
            log.warning("checkpoint %s was written by %d processes, resumed on %d: the global batch changes with "
                        "them, and the interrupted epoch goes on from batch %d of each rank's new plan (batch %d of "
                        "the old); rows are dealt to the ranks anew, so a few may be seen twice or not at all in "
                        "this epoch", path, state.world_size, world_size, state.micro, before)
        state.world_size = world_size
    if rank == 0:
        log.info("resumed from %s: step %d, epoch %d, %d batches of that epoch already done",
                 path, state.step, state.epoch, state.micro)
    return state
