"""Checkpoints: written atomically by rank 0, found again on resume. No distributed code here.

A checkpoint is a folder `<run folder>/checkpoints/step-00000120/` (the run folder `.NAME.run` beside output_dir) holding the model (safetensors; a sharded
run's weights and optimizer state in dcp/ instead, each rank's shards, see train/fsdp.py), the
optimizer, scheduler and loss-scaler states, every rank's RNG states (CPU and GPU), and `trainer_state.json` (step, epoch, position in
the epoch's batch plan, metrics so far). It is written under a temporary name and renamed into place; the
marker file COMPLETE is written last, so a folder without it is a checkpoint that was cut short.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from typing import Any, Optional

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
STATE = "trainer_state.json"
TRAINING_STATE = "training_state.pt"
PREFIX = "step-"


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def save(root: str, step: int, model, optimizer, scheduler, rng_states: list, state: dict[str, Any],
         keep_last: int, scaler: Optional[dict] = None, spare: Optional[int] = None) -> str:
    """Rank 0 writes a whole checkpoint: the weights, the optimizer and the rest."""
    tmp = begin(root, step)
    # The whole module's weights (base and any LoRA adapter) as safetensors: save_pretrained of a peft
    # model would keep only the adapter, and resuming needs everything the optimizer state refers to.
    from safetensors.torch import save_model

    save_model(model, os.path.join(tmp, "model.safetensors"))
    return finish(root, tmp, step, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                    "rng": rng_states, "scaler": scaler}, state, keep_last, spare)


def begin(root: str, step: int) -> str:
    """A fresh temporary folder for the checkpoint of `step` (a sharded checkpoint: every rank writes its
    shards into it before rank 0 calls `finish`)."""
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".tmp-{PREFIX}{step:08d}-{uuid.uuid4().hex[:6]}")
    os.makedirs(tmp)
    return tmp


def finish(root: str, tmp: str, step: int, training: dict, state: dict[str, Any], keep_last: int,
           spare: Optional[int] = None) -> str:
    """The rest of the checkpoint (the `training` states, the TrainState, the COMPLETE marker last), then
    the folder renamed into place and older ones pruned (but the checkpoint of step `spare`: train.keep_best's)."""
    import torch

    final = step_folder(root, step)
    torch.save(training, os.path.join(tmp, TRAINING_STATE))
    with open(os.path.join(tmp, STATE), "w") as f:
        json.dump(state, f)
    with open(os.path.join(tmp, COMPLETE), "w") as f:
        f.write(str(step))
    _fsync_dir(tmp)
    if os.path.exists(final):  # the same step again (e.g. a resumed run): aside, the new one in, then delete
        old = os.path.join(root, f".old-{os.path.basename(final)}-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    prune(root, keep_last, spare)
    return final


def _fsync_dir(path: str) -> None:
    for name in os.listdir(path):
        if os.path.isdir(os.path.join(path, name)):
            continue  # a sharded checkpoint's dcp/: its writers synced their own files
        with open(os.path.join(path, name), "rb") as f:
            os.fsync(f.fileno())


def complete(root: str) -> list[str]:
    """Complete checkpoints, oldest first. Incomplete ones are reported and skipped."""
    if not os.path.isdir(root):
        return []
    for name in sorted(os.listdir(root)):  # a replacement cut short between its renames: the old one back
        back = os.path.join(root, name[len(".old-"):].rsplit("-", 1)[0]) if name.startswith(".old-" + PREFIX) else None
        if back and not os.path.exists(back) and os.path.isfile(os.path.join(root, name, COMPLETE)):
            os.rename(os.path.join(root, name), back)
    found = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.startswith(PREFIX) and os.path.isfile(os.path.join(path, COMPLETE)):
            found.append(path)
        elif name.startswith((PREFIX, ".tmp-")):
            log.warning("ignoring incomplete checkpoint %s (no %s marker: it was cut short)", path, COMPLETE)
    return found


def latest(root: str) -> Optional[str]:
    found = complete(root)
    return found[-1] if found else None


def step_folder(root: str, step: int) -> str:
    return os.path.join(root, f"{PREFIX}{step:08d}")


def prune(root: str, keep_last: int, spare: Optional[int] = None) -> None:
    keep = step_folder(root, spare) if spare is not None else None
    for path in complete(root)[:-keep_last]:
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)
    for name in os.listdir(root):  # leftovers of checkpoints cut short by an earlier crash
        if name.startswith((".tmp-", ".old-")):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def load_state(path: str) -> dict[str, Any]:
    with open(os.path.join(path, STATE)) as f:
        return json.load(f)


def load_training_state(path: str) -> dict[str, Any]:
    """Our own checkpoint: tensors and plain containers only, so the safe `weights_only` loader suffices.

    Onto the CPU whatever device wrote it: without map_location, optimizer states written on cuda:N come
    back on cuda:N (every local rank would put a whole copy on GPU 0), and a CPU-only host cannot load a
    GPU run's checkpoint at all. optimizer.load_state_dict moves the states to the parameters' device."""
    import torch

    return torch.load(os.path.join(path, TRAINING_STATE), weights_only=True, map_location="cpu")


def load_weights(path: str, model) -> None:
    from safetensors.torch import load_model

    # Straight onto the device the model is on (a GPU rank reads its weights into GPU memory).
    device = str(next(model.parameters()).device)
    load_model(model, os.path.join(path, "model.safetensors"), device=device)
