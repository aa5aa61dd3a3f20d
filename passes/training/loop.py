"""Supervised training of a torch module on arrays, with optional distillation from a teacher's outputs.

Integer labels mean classification: cross-entropy, and the held-out figure is top-1 accuracy.
Float targets mean regression: mean squared error, held-out figure the MSE. With teacher
outputs (Hinton et al. 2015) the loss is
    (1 - alpha) * task loss + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
(regression: alpha * MSE to the teacher's outputs); alpha 0.5 and T 4 by default.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from tensorfold.ir.errors import PipelineError


@dataclass(frozen=True)
class Labelled:
    """Training inputs (batch first, the model's layout) and labels (int) or targets (float)."""
    x: np.ndarray
    y: np.ndarray
    what: str = "training data"

    @property
    def classification(self) -> bool:
        return self.y.dtype.kind in "iu"

    def split(self, holdout: float, seed: int) -> tuple["Labelled", "Labelled"]:
        """(train, held out): a seeded shuffle, at least one sample on each side."""
        order = np.random.default_rng(seed).permutation(len(self.y))
        held = min(max(int(round(holdout * len(order))), 1), len(order) - 1)
        fit, kept = order[held:], order[:held]
        return (Labelled(self.x[fit], self.y[fit], self.what),
                Labelled(self.x[kept], self.y[kept], f"{self.what} (held out)"))


@dataclass(frozen=True)
class FitOptions:
    epochs: int = 1
    lr: float = 1e-3
    batch: int = 64
    optimizer: str = "adam"        # adam or sgd (momentum 0.9, nesterov)
    weight_decay: float = 0.0
    schedule: str = "cosine"       # cosine (per batch, to 0) or constant
    alpha: float = 0.5             # weight of the teacher term when a teacher is given
    temperature: float = 4.0
    bn: str = "frozen"             # frozen: eval mode (BatchNorm statistics and dropout fixed); train
    seed: int = 0
    backoff: int = 0               # restarts at lr / 10 allowed when the held-out score collapses (see fit)
    keep_best: bool = False        # end on the best held-out weights seen, the starting ones included (see fit)


@dataclass
class FitHistory:
    metric: str                                  # "top1" or "mse"
    before: float
    epochs: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    lr: float = 0.0                              # the rate of the run that was kept
    backoffs: list[dict[str, float]] = field(default_factory=list)  # runs abandoned, each at its rate
    kept: dict[str, float] | None = None         # keep_best: the weights kept {"lr", "epoch" (0: the start), score}

    @property
    def after(self) -> float:
        if self.kept is not None:
            return self.kept[f"heldout_{self.metric}"]
        return self.epochs[-1][f"heldout_{self.metric}"] if self.epochs else self.before

    def better(self, score: float, than: float) -> bool:
        return score > than if self.metric == "top1" else score < than


def outputs(module: nn.Module, x: np.ndarray, batch: int = 256) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([_first(module(torch.from_numpy(x[i:i + batch]))) for i in range(0, len(x), batch)]).numpy()


def score(module: nn.Module, data: Labelled) -> float:
    out = outputs(module, data.x)
    if data.classification:
        return float(np.mean(np.argmax(out, axis=1) == data.y))
    return float(np.mean((out - data.y) ** 2))


def check_fits(module: nn.Module, data: Labelled, source: str, input_shape: Sequence[int]) -> None:
    """Clear errors for data that does not fit the model: input shape, label count, target shape."""
    if tuple(data.x.shape[1:]) != tuple(input_shape[1:]):
        raise PipelineError(f"{data.what}: samples have shape {tuple(data.x.shape[1:])}, {source} takes "
                            f"{tuple(input_shape[1:])} (batch first)")
    if len(data.x) != len(data.y):
        raise PipelineError(f"{data.what}: {len(data.x)} samples but {len(data.y)} labels")
    if len(data.y) < 2:
        raise PipelineError(f"{data.what}: fine-tuning needs at least 2 samples (one is held out)")
    out = outputs(module, data.x[:2])
    if data.classification:
        if out.ndim != 2:
            raise PipelineError(f"{data.what}: integer labels need (batch, classes) logits; {source} outputs "
                                f"shape {out.shape[1:]} per sample")
        if data.y.min() < 0 or data.y.max() >= out.shape[1]:
            raise PipelineError(f"{data.what}: labels span {int(data.y.min())}..{int(data.y.max())}, but {source} "
                                f"has {out.shape[1]} outputs (classes 0..{out.shape[1] - 1})")
    elif tuple(out.shape[1:]) != tuple(data.y.shape[1:]):
        raise PipelineError(f"{data.what}: targets have shape {tuple(data.y.shape[1:])} per sample, {source} "
                            f"outputs {tuple(out.shape[1:])}")


def fit(module: nn.Module, parameters: Sequence[nn.Parameter], train: Labelled, heldout: Labelled,
        options: FitOptions, teacher_outputs: np.ndarray | None = None, label: str = "finetune",
        progress: bool = False, penalty: Callable[[], torch.Tensor] | None = None) -> FitHistory:
    """Train `parameters` of `module` in place; seeded, the caller's RNG untouched; module ends in eval mode.
    `penalty()` is added to every batch's loss (e.g. ADMM's rho/2 ||W - Z + U||^2).

    With `options.backoff` > 0, a run whose held-out score collapses after an epoch (see `collapsed`)
    or whose loss stops being finite is abandoned: the weights go back to where they started and
    training restarts at lr / 10, at most `backoff` times. A rate that suits a small model can wreck
    a deep BN-folded one in a single epoch (ResNet-18: held-out 79 % -> chance at Adam 1e-3), and a
    user should not have to find that out.

    With `options.keep_best`, the module ends on the best held-out weights seen in any run, the
    starting ones included (`history.kept` says which), and a run none of whose epochs reaches the
    starting score backs off too: a Tucker-2 ResNet-18 at Adam 1e-3 went 92.8 % -> 85.6 -> 90.7 %
    held out without collapsing, and the last epoch was what it delivered."""
    if options.bn not in ("frozen", "train"):
        raise PipelineError(f"{label}: bn={options.bn!r}; expected frozen or train")
    if options.schedule not in ("cosine", "constant"):
        raise PipelineError(f"{label}: schedule={options.schedule!r}; expected cosine or constant")
    if not parameters:
        raise PipelineError(f"{label}: nothing to train (every layer frozen)")
    history = FitHistory("top1" if train.classification else "mse", score(module.eval(), heldout))
    started = time.perf_counter()
    initial = _snapshot(module) if options.backoff or options.keep_best else None
    best = {"lr": options.lr, "epoch": 0, "score": history.before, "state": initial}

    def keep(epoch: int, held: float) -> None:  # the best weights so far, when asked to keep them
        if options.keep_best and history.better(held, best["score"]):
            best.update(lr=history.lr, epoch=epoch, score=held, state=_snapshot(module))

    lr = options.lr
    for attempt in range(options.backoff + 1):
        history.epochs, history.lr = [], lr
        last_try = attempt == options.backoff
        failure = _run(module, parameters, train, heldout, options, lr, teacher_outputs, label, progress, penalty,
                       history, last_try, keep)
        if failure is None and options.keep_best and not last_try and not _reached_start(history):
            failure = {"epoch": len(history.epochs), "ended": history.epochs[-1][f"heldout_{history.metric}"]}
        if failure is None:
            break
        history.backoffs.append({"lr": lr, **failure, "why": _describe(failure, history)})
        _say(progress, f"{label}: {history.backoffs[-1]['why']} at lr {lr:g}; restarting from the starting weights "
                       f"at lr {lr / 10:g}")
        module.load_state_dict(initial)
        lr /= 10
    if options.keep_best:
        module.load_state_dict(best["state"])
        history.kept = {"lr": best["lr"], "epoch": best["epoch"], f"heldout_{history.metric}": best["score"]}
        if best["epoch"] == 0:
            _say(progress, f"{label}: no epoch beat the starting held-out {history.metric} {history.before:.4f}; "
                           "the starting weights are kept")
    history.seconds = time.perf_counter() - started
    module.eval()
    return history


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _reached_start(history: FitHistory) -> bool:
    """Some epoch of the last run scored at least as well as the start on the held-out data."""
    key = f"heldout_{history.metric}"
    return any(not history.better(history.before, e[key]) for e in history.epochs)


def _run(module: nn.Module, parameters: Sequence[nn.Parameter], train: Labelled, heldout: Labelled,
         options: FitOptions, lr: float, teacher_outputs: np.ndarray | None, label: str, progress: bool,
         penalty: Callable[[], torch.Tensor] | None, history: FitHistory, last_try: bool,
         keep: Callable[[int, float], None]) -> dict | None:
    """One training run at `lr`, epochs appended to `history`; a failure description to back off on, or None."""
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    teacher = None if teacher_outputs is None else torch.from_numpy(np.asarray(teacher_outputs, np.float32))
    steps = math.ceil(len(y) / options.batch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        optimizer = _optimizer(parameters, options, lr, label)
        total_steps = max(options.epochs * steps, 1)
        schedule = (torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))
                    if options.schedule == "cosine" else None)
        generator = torch.Generator().manual_seed(options.seed)
        with _epoch_progress(label, options.epochs, steps, progress) as (advance, end_epoch):
            for epoch in range(options.epochs):
                _train_mode(module, options.bn, label)
                order = torch.randperm(len(y), generator=generator)
                total = 0.0
                for first in range(0, len(y), options.batch):
                    index = order[first:first + options.batch]
                    optimizer.zero_grad()
                    student = _first(module(x[index]))
                    loss = _loss(student, y[index], None if teacher is None else teacher[index], train.classification,
                                 options)
                    if penalty is not None:
                        loss = loss + penalty()
                    if not torch.isfinite(loss):
                        if not last_try:
                            return {"epoch": epoch + 1, "loss": float(loss.item())}
                        raise PipelineError(f"{label}: the training loss became {loss.item()} in epoch {epoch + 1}; "
                                            f"lower lr (now {lr:g})")
                    loss.backward()
                    optimizer.step()
                    if schedule is not None:
                        schedule.step()
                    total += loss.item() * len(index)
                    advance()
                module.eval()
                held = score(module, heldout)
                history.epochs.append({"epoch": epoch + 1, "loss": total / len(y), f"heldout_{history.metric}": held})
                end_epoch(epoch + 1, total / len(y), history.metric, held)
                keep(epoch + 1, held)
                if not last_try and collapsed(history.before, held, train.classification, _constant(heldout)):
                    return {"epoch": epoch + 1, "heldout": held}
    return None


def collapsed(before: float, held: float, classification: bool, constant: float = 0.0) -> bool:
    """A held-out score that training should never produce from a working start: accuracy down by
    more than max(0.05, a tenth of its start), or MSE up by half. `constant`: the accuracy of always
    answering the most frequent class; a model that started clearly above it and fell most of the way
    down to it has collapsed too (a CP-ALS ResNet fine-tuned at 3e-4: 0.155 -> 0.106 on 10 balanced
    classes, which the relative rule alone lets through)."""
    if classification:
        to_constant = before - constant > 0.02 and held < before and held <= constant + 0.25 * (before - constant)
        return held < before - max(0.05, 0.1 * before) or to_constant
    return held > 1.5 * before + 1e-12


def _constant(data: Labelled) -> float:
    """Accuracy of always answering the most frequent class (0 for regression)."""
    return float(np.bincount(data.y).max() / len(data.y)) if data.classification else 0.0


def _describe(failure: dict, history: FitHistory) -> str:
    name = "accuracy" if history.metric == "top1" else "MSE"
    if "heldout" in failure:
        return f"held-out {name} went {history.before:.4f} -> {failure['heldout']:.4f} in epoch {failure['epoch']}"
    if "ended" in failure:
        return (f"no epoch reached the starting held-out {name} {history.before:.4f} (epoch {failure['epoch']}: "
                f"{failure['ended']:.4f})")
    return f"the loss became {failure['loss']} in epoch {failure['epoch']}"


def _say(enabled: bool, line: str) -> None:
    if enabled:
        print(f"  {line}", file=sys.stderr, flush=True)


def _loss(student: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None, classification: bool,
          options: FitOptions) -> torch.Tensor:
    task = F.cross_entropy(student, labels) if classification else F.mse_loss(student, labels)
    if teacher is None:
        return task
    if classification:
        t = options.temperature
        soft = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1), log_target=True,
                        reduction="batchmean") * t * t
    else:
        soft = F.mse_loss(student, teacher)
    return (1 - options.alpha) * task + options.alpha * soft


def _optimizer(parameters: Sequence[nn.Parameter], options: FitOptions, lr: float, label: str) -> torch.optim.Optimizer:
    if options.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=options.weight_decay)
    if options.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9, nesterov=True, weight_decay=options.weight_decay)
    raise PipelineError(f"{label}: optimizer={options.optimizer!r}; expected adam or sgd")


def _train_mode(module: nn.Module, bn: str, label: str) -> None:
    if bn == "frozen":
        module.eval()
        return
    try:
        module.train()
    except NotImplementedError:  # torch.export modules cannot switch mode
        raise PipelineError(f"{label}: bn=train needs a module that can switch to training mode; this graph was "
                            "captured by torch.export, which fixes it: use bn=frozen") from None


def _first(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


class _epoch_progress:
    """A rich bar on a terminal; one plain line per epoch otherwise (CI logs); nothing when disabled."""

    def __init__(self, label: str, epochs: int, steps: int, enabled: bool):
        self.label, self.epochs, self.steps, self.enabled = label, epochs, steps, enabled
        self.bar = None

    def __enter__(self) -> tuple[Callable[[], None], Callable[[int, float, str, float], None]]:
        if self.enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), console=Console(file=sys.stderr), transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task(f"{self.label}: epoch 1/{self.epochs}", total=self.epochs * self.steps)
        return (lambda: self.bar.advance(self.task)) if self.bar else (lambda: None), self._end_epoch

    def _end_epoch(self, epoch: int, loss: float, metric: str, held: float) -> None:
        line = f"{self.label}: epoch {epoch}/{self.epochs} loss {loss:.4f} held-out {metric} {held:.4f}"
        if self.bar is not None:
            self.bar.console.print(line)
        elif self.enabled:
            print(f"  {line}", file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
