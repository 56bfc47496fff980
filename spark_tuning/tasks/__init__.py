"""One file per task: everything task-specific (columns and checks, the data stage, the model head,
evaluation, outputs, what the served model needs). The interface is `tasks.base.Task`; `get_task(name)`
gives the one for `cfg.task`. A new task is a new file here, with a TASK object, and its name added
below and to config.TASKS."""

from __future__ import annotations

from spark_tuning.tasks.base import Staged, Task

__all__ = ["Staged", "Task", "get_task"]


def get_task(name: str) -> Task:
    from spark_tuning.tasks import causal_lm, classification, sft

    tasks = {m.TASK.name: m.TASK for m in (classification, causal_lm, sft)}
    if name not in tasks:
        raise KeyError(f"no task {name!r}: {sorted(tasks)}")
    return tasks[name]
