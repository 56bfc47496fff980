"""Start the training processes with pyspark's TorchDistributor, after checking that they can start."""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

from spark_tuning.config import DistributedConfig
from spark_tuning.errors import InputError, JobFailed


def visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


def check_resources(cfg: DistributedConfig, spark=None) -> None:
    """Refuse settings that cannot run, before anything starts. Without `spark`, only what the driver
    machine can tell (local mode); with it, the cluster's task slots too."""
    n = cfg.num_processes
    if cfg.use_gpu:
        gpus = visible_gpus()
        if cfg.local_mode and gpus == 0:
            raise InputError(
                "distributed.use_gpu = true, but no GPU is visible here: set distributed.use_gpu: false "
                "(CPU processes with gloo) or run on a GPU machine"
            )
        if cfg.local_mode and n > gpus:
            raise InputError(
                f"distributed.num_processes = {n} is more than the {gpus} GPUs visible here: "
                f"set distributed.num_processes to at most {gpus}"
            )
    elif cfg.local_mode:
        cores = os.cpu_count() or 1
        if n > cores:
            raise InputError(
                f"distributed.num_processes = {n} is more than the {cores} CPU cores here: "
                f"set distributed.num_processes to at most {cores}"
            )
    if spark is not None and not cfg.local_mode:
        slots = spark.sparkContext.defaultParallelism
        if n > slots:
            raise InputError(
                f"distributed.num_processes = {n}, but the cluster ({spark.sparkContext.master}) has only "
                f"{slots} task slots for the barrier stage: lower distributed.num_processes, add executors "
                "or cores, or use distributed.local_mode: true"
            )


def run_distributed(train_fn: Callable[[dict], Any], payload: dict, cfg: DistributedConfig) -> Optional[Any]:
    """TorchDistributor(...).run(train_fn, payload): DDP over gloo (CPU) or NCCL (GPU)."""
    from pyspark.ml.torch.distributor import TorchDistributor

    distributor = TorchDistributor(num_processes=cfg.num_processes, local_mode=cfg.local_mode, use_gpu=cfg.use_gpu)
    try:
        return distributor.run(train_fn, payload)
    except Exception as e:  # noqa: BLE001
        raise JobFailed(f"training failed: {_summarise(e)}") from e


def _summarise(e: Exception) -> str:
    """TorchDistributor's error holds the worker command and its last 100 lines: keep the useful end."""
    text = str(e)
    lines = [l for l in text.splitlines() if l.strip()]
    tail = "\n".join(lines[-40:])
    return tail if len(lines) > 1 else text
