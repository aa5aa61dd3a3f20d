"""Trained example models: the task registry (`tensorfold.runtime.tasks`), re-exported; `digits` keeps its old module."""
from tensorfold.runtime.tasks import get_task, list_tasks, task_names

__all__ = ["get_task", "list_tasks", "task_names"]
