"""`mnist1d-mlp` and `mnist1d-cnn`: the MNIST-1D benchmark (Greydanus & Steinbach) and the paper's two models.

The data is generated on this machine by the `mnist1d` package (`make_dataset` with the
default arguments: 4000 train / 1000 test signals of length 40). `mnist1d.data.get_dataset`
downloads a pickle: never called here. The recipe is the paper's: Adam, lr 1e-2, batch 100,
6000 steps (150 epochs of 40 batches).
"""
from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

from .task import Split, Task, TaskError

LENGTH = 40
RECIPE = {"version": 1, "seed": 0, "epochs": 150, "lr": 1e-2, "batch": 100}


class MLP(nn.Module):
    """The paper's MLP: 40 -> 100 -> 100 -> 10, ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(LENGTH, 100)
        self.fc2 = nn.Linear(100, 100)
        self.fc3 = nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class ConvBase(nn.Module):
    """The paper's CNN: three stride-2 1-D convs (25 channels), ReLU, a linear layer on the 25 x 5 features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, 25, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(25, 25, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(25, 25, 3, stride=2, padding=1)
        self.linear = nn.Linear(25 * 5, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x))))))
        return self.linear(torch.flatten(x, 1))


def signals() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_x, train_y, test_x, test_y): float32 (N, 40) signals, int64 labels; 4000 / 1000."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:
        raise TaskError(f"the MNIST-1D tasks need the mnist1d package (a tensorfold dependency): "
                        f"pip install 'mnist1d>=0.0.2' ({e})") from e

    # make_dataset seeds numpy's and Python's global generators: leave the caller's as they were
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    return (data["x"].astype(np.float32), data["y"].astype(np.int64),
            data["x_test"].astype(np.float32), data["y_test"].astype(np.int64))


def _mlp_split() -> Split:
    return Split(*signals())


def _cnn_split() -> Split:
    train_x, train_y, test_x, test_y = signals()
    return Split(train_x[:, None, :], train_y, test_x[:, None, :], test_y)


WHY = ("a benchmark whose published baselines we can check against: the gap between an MLP and a CNN "
       "on the same data shows what an architecture's inductive bias buys")

MLP_TASK = Task(
    name="mnist1d-mlp",
    description="MLP 40-100-100-10 (ReLU) on MNIST-1D (1-D digit templates, shifted, scaled, sheared, noised; "
                "length 40)",
    why=WHY + "; the MLP is the Linear-only workflow (SVD, TT)",
    factory=MLP,
    input_shape=(1, LENGTH),
    make_split=_mlp_split,
    recipe=RECIPE,
    calibration_count=500,
)

CNN_TASK = Task(
    name="mnist1d-cnn",
    description="1-D CNN (the paper's ConvBase: 3 stride-2 Conv1d, 25 channels, then Linear) on MNIST-1D",
    why=WHY + "; the CNN is the 1-D convolution workflow",
    factory=ConvBase,
    input_shape=(1, 1, LENGTH),
    make_split=_cnn_split,
    recipe=RECIPE,
    calibration_count=500,
)
