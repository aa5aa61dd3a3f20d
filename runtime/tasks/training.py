"""The one supervised training loop every task uses, driven by the task's recipe.

Recipe keys (defaults never change: a new behaviour gets a new key, so a cached file's
recipe always says how it was trained): seed, epochs, lr, batch; optimizer "adam" (default)
or "sgd" (momentum, nesterov); weight_decay (0); schedule None or "onecycle" (per batch);
label_smoothing (0); threads (1); loss "cross_entropy" (default) or "mse" (regression targets).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .progress import training_progress

if TYPE_CHECKING:
    from .task import Task


def fit(task: "Task", verbose: bool = True) -> tuple[nn.Module, float]:
    """(trained model in eval mode, seconds): seeded, in `threads` torch threads, the caller's RNG untouched."""
    recipe = task.recipe
    train_x, train_y = task.train_data()
    x, y = torch.from_numpy(train_x), torch.from_numpy(train_y)
    batch, epochs = recipe["batch"], recipe["epochs"]
    threads = torch.get_num_threads()
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe["seed"])
        # Fixed thread count: the reduction order (hence the weights' last bits) depends on it.
        torch.set_num_threads(recipe.get("threads", 1))
        try:
            model = task.factory()
            optimizer = _optimizer(model, recipe)
            steps = -(-len(y) // batch)
            scheduler = _scheduler(optimizer, recipe, epochs * steps)
            generator = torch.Generator().manual_seed(recipe["seed"])
            with training_progress(task.name, epochs, steps, verbose) as (advance, end_epoch):
                for epoch in range(epochs):
                    model.train()
                    order = torch.randperm(len(y), generator=generator)
                    total = 0.0
                    for first in range(0, len(y), batch):
                        indices = order[first:first + batch]
                        optimizer.zero_grad()
                        loss = _loss(model(x[indices]), y[indices], recipe)
                        loss.backward()
                        optimizer.step()
                        if scheduler is not None:
                            scheduler.step()
                        total += loss.item() * len(indices)
                        advance()
                    end_epoch(epoch + 1, total / len(y))
        finally:
            torch.set_num_threads(threads)
    return model.eval(), time.perf_counter() - start


def _loss(outputs: torch.Tensor, targets: torch.Tensor, recipe: dict[str, Any]) -> torch.Tensor:
    kind = recipe.get("loss", "cross_entropy")
    if kind == "cross_entropy":
        return F.cross_entropy(outputs, targets, label_smoothing=recipe.get("label_smoothing", 0.0))
    if kind == "mse":
        return F.mse_loss(outputs, targets)
    raise ValueError(f"training recipe: unknown loss {kind!r} (cross_entropy or mse)")


def predict(model: nn.Module, images: np.ndarray, threads: int = 1, batch: int = 256) -> np.ndarray:
    """The model's outputs on `images` (eval mode, no grad), in batches."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            return torch.cat([model(torch.from_numpy(images[i:i + batch])) for i in range(0, len(images), batch)]).numpy()
    finally:
        torch.set_num_threads(saved)


def _optimizer(model: nn.Module, recipe: dict[str, Any]) -> torch.optim.Optimizer:
    kind, decay = recipe.get("optimizer", "adam"), recipe.get("weight_decay", 0.0)
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=recipe["lr"], weight_decay=decay)
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=recipe["lr"], momentum=recipe.get("momentum", 0.9),
                               nesterov=recipe.get("nesterov", True), weight_decay=decay)
    raise ValueError(f"training recipe: unknown optimizer {kind!r} (adam or sgd)")


def _scheduler(optimizer: torch.optim.Optimizer, recipe: dict[str, Any], total_steps: int):
    schedule = recipe.get("schedule")
    if schedule is None:
        return None
    if schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe["lr"], total_steps=total_steps)
    raise ValueError(f"training recipe: unknown schedule {schedule!r} (None or onecycle)")
