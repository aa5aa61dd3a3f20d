"""A trained task: a model factory, its data, a training recipe and an evaluator, trained once then cached."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from tensorfold.ir.errors import TensorfoldError

from ..machine import cpu_description
from . import cache, training
from .evaluators import Evaluator, top1


class TaskError(TensorfoldError):
    """No task has this name, or its cached model cannot be used."""


@dataclass(frozen=True)
class Split:
    """Train and held-out test arrays: x float32 in the model's input layout (batch first), y the labels."""
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


@dataclass(frozen=True, eq=False)
class Task:
    name: str
    description: str                  # one line: the model and the data
    why: str                          # what this task is for, in one sentence
    factory: Callable[[], nn.Module]  # the untrained model
    input_shape: tuple[int, ...]      # batch 1
    make_split: Callable[[], Split]   # deterministic, generated or shipped locally: never downloaded
    recipe: dict[str, Any]            # keys the cache file (training.py lists the keys)
    calibration_count: int = 512      # calibration = the first N training samples; test stays held out
    evaluator: Evaluator = top1
    metric: str = "top1"              # the evaluator's headline key
    metric_name: str = "accuracy"     # how reports call it
    weights_stem: str = ""            # cache file name stem (default: the task name)
    _splits: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    # ---- data ------------------------------------------------------------------------------
    def split(self) -> Split:
        """The data, generated once per process; callers get copies, so nobody alters the shared arrays."""
        s = self._shared_split()
        return Split(s.train_x.copy(), s.train_y.copy(), s.test_x.copy(), s.test_y.copy())

    def _shared_split(self) -> Split:
        if "split" not in self._splits:
            self._splits["split"] = self.make_split()
        return self._splits["split"]

    def train_data(self) -> tuple[np.ndarray, np.ndarray]:
        s = self._shared_split()
        return s.train_x.copy(), s.train_y.copy()

    def test_data(self) -> tuple[np.ndarray, np.ndarray]:
        s = self._shared_split()
        return s.test_x.copy(), s.test_y.copy()

    def calibration_data(self) -> np.ndarray:
        return self._shared_split().train_x[:self.calibration_count].copy()

    def sizes(self) -> tuple[int, int]:
        """(train samples, test samples)."""
        s = self._shared_split()
        return len(s.train_y), len(s.test_y)

    # ---- the trained model -------------------------------------------------------------------
    def weights_path(self) -> Path:
        return cache.weights_path(self.weights_stem or self.name, self.recipe)

    def model(self, verbose: bool = True) -> nn.Module:
        """The trained model (eval mode): trained on first use with the recipe's seed, then read from the cache."""
        path = self.weights_path()
        if path.exists():
            net = self.factory()
            try:
                net.load_state_dict(torch.load(path, weights_only=True))
            except (RuntimeError, OSError, ValueError) as e:
                raise TaskError(f"{path}: cached weights of task {self.name!r} do not load into its model ({e}); "
                                "delete the file to retrain") from e
            net.eval()
            if cache.read_json(cache.baseline_path(path)) is None:  # weights cached before baselines were recorded
                self._record_baseline(net, seconds=None)
            return net
        if verbose:
            print(f"training the {self.name} task (first use; cached at {path})", file=sys.stderr, flush=True)
        net, seconds = training.fit(self, verbose)
        cache.write_atomic(path, lambda tmp: torch.save(net.state_dict(), tmp))
        record = self._record_baseline(net, seconds)
        if verbose:
            print(f"  {self.name}: trained in {seconds:.1f} s; test {self.metric_name} "
                  f"{record[self.metric]:.4f}", file=sys.stderr, flush=True)
        return net

    def evaluate(self, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return self.evaluator(outputs, labels)

    def baseline(self) -> dict[str, Any] | None:
        """The cached model's test scores ({metric: value, ...}), or None before it is trained (never trains)."""
        path = self.weights_path()
        if not path.exists():
            return None
        record = cache.read_json(cache.baseline_path(path))
        if record is None:  # weights cached before baselines were recorded: evaluating them records it
            self.model(verbose=False)
            record = cache.read_json(cache.baseline_path(path))
        return record

    def _record_baseline(self, net: nn.Module, seconds: float | None) -> dict[str, Any]:
        test_x, test_y = self.test_data()
        scores = self.evaluate(training.predict(net, test_x, self.recipe.get("threads", 1)), test_y)
        record = {"task": self.name, **scores, "test_samples": int(len(test_y)), "recipe": self.recipe,
                  "train_seconds": None if seconds is None else round(seconds, 1),
                  "cpu": cpu_description(), "torch": torch.__version__}
        cache.write_json(cache.baseline_path(self.weights_path()), record)
        return record
