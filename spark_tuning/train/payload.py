"""What every rank receives: plain, picklable data only (never a SparkSession), typed. finetune.run
builds it; TorchDistributor pickles `to_dict()` to the ranks; `train_fn` reads it back with `from_dict`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class TrainPayload:
    config: dict  # Config.to_dict()
    model_source: dict  # ModelSource fields: location, is_local, gguf_file
    train_ref: dict  # the staged splits (loader refs as dicts)
    eval_ref: dict
    model_dir: str  # where rank 0 saves the trained model
    id2label: dict = field(default_factory=dict)  # str(id) -> label name
    task_extras: dict = field(default_factory=dict)  # what the task's data stage hands the ranks
    events: Optional[str] = None  # rank 0's events file, relayed into MLflow by the driver
    log_dir: Optional[str] = None  # a log file per rank (failure reports)
    resume_from: Optional[str] = None  # a checkpoint to continue from
    checkpoint: Optional[dict] = None  # {"dir", "every_steps", "keep_last"}; None: no checkpoints

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrainPayload":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"unknown training payload keys {unknown}: expected {sorted(names)}")
        return cls(**raw)
