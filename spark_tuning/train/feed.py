"""Feeding batches to the device: the next batch collated (and pinned) in a thread while the current one
trains, copied to the GPU without blocking, and the time the loop waits for data counted."""

from __future__ import annotations

import queue
import threading
import time
from typing import Iterable, Iterator

import numpy as np


def to_device(batch: dict, device: str) -> dict:
    """Host batch -> device. On CUDA from pinned memory and non-blocking: the copy overlaps the work
    already queued on the GPU (`pinned` below pins in the prefetch thread, off the training thread)."""
    import torch

    cuda = device.startswith("cuda")
    out = {}
    for k, v in batch.items():
        t = torch.from_numpy(v) if isinstance(v, np.ndarray) else v
        out[k] = t.to(device, non_blocking=cuda and t.is_pinned())
    return out


def pinned(batch: dict[str, np.ndarray], device: str) -> dict:
    """Tensors of `batch`, in page-locked memory where the copy goes to a GPU."""
    import torch

    tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
    return {k: t.pin_memory() for k, t in tensors.items()} if device.startswith("cuda") else tensors


def ahead(items: Iterable, depth: int = 2) -> Iterator:
    """Yield from `items`, producing up to `depth` items ahead in a thread: the next batch is collated
    (and pinned) while the current one trains. An error in the thread is raised here; leaving early
    stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop, done = threading.Event(), object()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((None, item)):
                    return
            put((None, done))
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, raised there
            put((e, None))

    thread = threading.Thread(target=work, name="spark-tuning-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            error, item = q.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()


def train_batches(shard, plan, pad_id: int, device: str, collate_fn) -> Iterator:
    """(index, host batch, tensors to copy) of each planned batch, collated (by the task) ahead in a thread."""
    from spark_tuning.loader.batches import iterate

    return ahead((index, batch, pinned(batch, device)) for index, batch in iterate(shard, plan, pad_id, collate_fn))


def timed(batches, clock: dict[str, float]):
    """Yield from `batches`, adding the time spent waiting for each one to clock["data"]: the loader's
    share of a training step, comparable between loader backends. Closing this closes `batches`."""
    it = iter(batches)
    try:
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            clock["data"] += time.perf_counter() - t
            yield item
    finally:
        if hasattr(it, "close"):
            it.close()
