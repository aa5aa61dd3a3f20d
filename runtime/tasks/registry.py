"""Tasks by name. A task module defines a `Task`; this list makes it one everywhere a model name is accepted."""
from __future__ import annotations

import difflib

from . import digits, image_mlp, mnist1d, resnet_digits
from .task import Task, TaskError

_TASKS: dict[str, Task] = {t.name: t for t in (digits.TASK, mnist1d.MLP_TASK, mnist1d.CNN_TASK, resnet_digits.TASK, image_mlp.TASK)}


def task_names() -> list[str]:
    return list(_TASKS)


def list_tasks() -> list[Task]:
    return list(_TASKS.values())


def is_task(name: object) -> bool:
    return isinstance(name, str) and name in _TASKS


def get_task(name: str) -> Task:
    if name in _TASKS:
        return _TASKS[name]
    raise TaskError(f"{name!r}: no such task{did_you_mean(name)}; tasks: {', '.join(_TASKS)} (`tensorfold tasks`)")


def did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name, list(_TASKS), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def register(task: Task) -> Task:
    """Add a task (e.g. from a user's own module); a name already taken is refused."""
    if task.name in _TASKS:
        raise TaskError(f"task {task.name!r} is already registered")
    _TASKS[task.name] = task
    return task
