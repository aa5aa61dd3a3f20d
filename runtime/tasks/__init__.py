"""Trained tasks by name: a model, its data (train / calibration / held-out test), a training recipe and an
evaluator; each model is trained on first use with a fixed seed and cached (`cache.py`).

    from tensorfold.runtime.tasks import get_task
    task = get_task("mnist1d-cnn")
    net = task.model()                        # trained once, then read from the cache
    scores = task.evaluate(outputs, labels)   # {"top1": ...}
"""
from .evaluators import Evaluator, image_psnr, psnr, top1
from .registry import did_you_mean, get_task, is_task, list_tasks, register, task_names
from .task import Split, Task, TaskError

__all__ = ["Evaluator", "image_psnr", "Split", "Task", "TaskError", "did_you_mean", "get_task", "is_task", "list_tasks", "psnr",
           "register", "task_names", "top1"]
