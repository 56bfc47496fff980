"""One file per task: everything task-specific (columns and checks, the data stage, the model head,
collation and loss, evaluation, outputs, what the served model answers and what verify compares). The
interface is `tasks.base.Task`; `get_task(name)` gives the one for `cfg.task`. A new task is a new file
here with a TASK object (found by `all_tasks`, so `task:` accepts its name), plus its tests; the served
model (deploy/serving_model.py, self-contained) also needs to know how to answer for it."""

from __future__ import annotations

import functools
import importlib
import pkgutil

from spark_tuning.tasks.base import Staged, Task

__all__ = ["Staged", "Task", "all_tasks", "get_task"]


@functools.lru_cache(maxsize=1)
def all_tasks() -> dict[str, Task]:
    """Every module of this package that defines a TASK, by the task's name (classification first)."""
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: (m.name != "classification", m.name)):
        task = getattr(importlib.import_module(f"{__name__}.{info.name}"), "TASK", None)
        if isinstance(task, Task):
            found[task.name] = task
    return found


def get_task(name: str) -> Task:
    tasks = all_tasks()
    if name not in tasks:
        raise KeyError(f"no task {name!r}: {sorted(tasks)}")
    return tasks[name]
