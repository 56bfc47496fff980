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
    """payload["log_dir"], when set, is where each rank writes its own log (see faults.py)."""
    """TorchDistributor(...).run(train_fn, payload): DDP over gloo (CPU) or NCCL (GPU)."""
    from pyspark.ml.torch.distributor import TorchDistributor

    distributor = TorchDistributor(num_processes=cfg.num_processes, local_mode=cfg.local_mode, use_gpu=cfg.use_gpu)
    try:
        return distributor.run(train_fn, payload)
    except Exception as e:  # noqa: BLE001
        from spark_tuning.faults import describe_failure

        raise JobFailed(f"training failed: {describe_failure(payload.get('log_dir')) or _summarise(e)}") from e


def _summarise(e: Exception) -> str:
    """TorchDistributor's error holds torchrun's failure report and the last 100 lines of output. Say which
    rank failed and how, then show that rank's own last lines (worker log lines carry "[rank N]")."""
    import re

    text = str(e)
    lines = [line for line in text.splitlines() if line.strip()]
    rank = re.search(r"rank\s*:\s*(\d+)", text)
    code = re.search(r"exitcode\s*:\s*(-?\d+)", text)
    cause = re.search(r"traceback\s*:\s*(.+)", text)
    if not rank:
        return "\n".join(lines[-40:]) if len(lines) > 1 else text
    r = rank.group(1)
    own = [line for line in lines if f"[rank {r}]" in line][-15:]
    errors = [line for line in lines if re.search(r"(Error|Exception)\b", line) and "ChildFailedError" not in line][-5:]
    parts = [f"training process rank {r} failed (exit code {code.group(1) if code else '?'}"
             + (f": {cause.group(1).strip()}" if cause and "<N/A>" not in cause.group(1) else "") + ")"]
    if errors:
        parts += ["errors:", *errors]
    parts += [f"last log lines of rank {r}:", *(own or ["(none)"])]
    return "\n".join(parts)
