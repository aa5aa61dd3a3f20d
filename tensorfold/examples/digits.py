"""The bundled digits example: now the `digits` task (`tensorfold.runtime.tasks.digits`); this keeps old imports working."""
from __future__ import annotations

import numpy as np

from tensorfold.runtime.tasks import training
from tensorfold.runtime.tasks.digits import INPUT_SHAPE, RECIPE, TASK, DigitsCNN, load_split


def model(verbose: bool = True) -> DigitsCNN:
    """The trained CNN (eval mode): trained on first use, then read from the cache."""
    return TASK.model(verbose)


model.example_input_shape = INPUT_SHAPE  # type: ignore[attr-defined]


def train(verbose: bool = True) -> DigitsCNN:
    return training.fit(TASK, verbose)[0]


def test_data() -> tuple[np.ndarray, np.ndarray]:
    return TASK.test_data()


__all__ = ["INPUT_SHAPE", "RECIPE", "DigitsCNN", "load_split", "model", "test_data", "train"]
