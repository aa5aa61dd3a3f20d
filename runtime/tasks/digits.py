"""`digits`: a small CNN with BatchNorm on scikit-learn's digits (shipped inside scikit-learn).

Images are upsampled from 8x8 to 32x32 so the convolutions have something to do.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .task import Split, Task

INPUT_SHAPE = (1, 1, 32, 32)
# Unchanged since the example was bundled: its hash names the weights users already have cached.
RECIPE = {"version": 1, "seed": 0, "epochs": 12, "lr": 3e-3, "batch": 64, "test_fraction": 0.2}


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(64)
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.bn4 = nn.BatchNorm1d(128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2)
        x = F.relu(self.bn4(self.fc1(torch.flatten(x, 1))))
        return self.fc2(x)


def digit_images(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as float32 (N, 1, size, size) in [0, 1] (bilinear from 8x8), and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.numpy(), digits.target.astype(np.int64)


def source_split(seed: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices) into the 1797 digits: a seeded permutation, test first."""
    order = np.random.default_rng(seed).permutation(1797)
    n_test = int(1797 * test_fraction)
    return order[n_test:], order[:n_test]


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_x, train_y, test_x, test_y); x is float32 (N, 1, 32, 32) in about [-1, 1]."""
    images, labels = digit_images(INPUT_SHAPE[2])
    images = (images - 0.5) / 0.5
    train, test = source_split(RECIPE["seed"], RECIPE["test_fraction"])
    return images[train], labels[train], images[test], labels[test]


TASK = Task(
    name="digits",
    description="a 4-layer CNN with BatchNorm (conv 16-32-64, fc 128) on scikit-learn's 8x8 digits upsampled to 32x32",
    why="the smallest real model: BatchNorm to fold, trained in seconds, the default for quick checks",
    factory=DigitsCNN,
    input_shape=INPUT_SHAPE,
    make_split=lambda: Split(*load_split()),
    recipe=RECIPE,
    calibration_count=512,
    weights_stem="digits_cnn",
)
