"""The bundled example: a small CNN with BatchNorm trained on scikit-learn's digits.

The data ships inside scikit-learn (no download). Images are upsampled from 8x8 to
32x32 so the convolutions have something to do. Training is deterministic (fixed
seed, one thread) and takes seconds on 2 cores; the weights are cached in the user
cache directory under a key that changes whenever the recipe does.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

INPUT_SHAPE = (1, 1, 32, 32)
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


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_x, train_y, test_x, test_y); x is float32 (N, 1, 32, 32) in about [-1, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    images = F.interpolate(images, size=INPUT_SHAPE[2:], mode="bilinear", align_corners=False)
    images = ((images - 0.5) / 0.5).numpy()
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(RECIPE["seed"]).permutation(len(labels))
    n_test = int(len(labels) * RECIPE["test_fraction"])
    test, train = order[:n_test], order[n_test:]
    return images[train], labels[train], images[test], labels[test]


def _cache_path() -> Path:
    root = Path(os.environ.get("TENSORFOLD_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tensorfold"))
    key = hashlib.sha256(repr(sorted(RECIPE.items())).encode()).hexdigest()[:12]
    return root / f"digits_cnn_{key}.pt"


def train(verbose: bool = True) -> DigitsCNN:
    train_x, train_y, _, _ = load_split()
    torch.manual_seed(RECIPE["seed"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same weights on every machine
    try:
        model = DigitsCNN()
        optimizer = torch.optim.Adam(model.parameters(), lr=RECIPE["lr"])
        x, y = torch.from_numpy(train_x), torch.from_numpy(train_y)
        generator = torch.Generator().manual_seed(RECIPE["seed"])
        for epoch in range(RECIPE["epochs"]):
            model.train()
            order = torch.randperm(len(y), generator=generator)
            total = 0.0
            for start in range(0, len(y), RECIPE["batch"]):
                batch = order[start:start + RECIPE["batch"]]
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x[batch]), y[batch])
                loss.backward()
                optimizer.step()
                total += loss.item() * len(batch)
            if verbose:
                print(f"  digits CNN: epoch {epoch + 1}/{RECIPE['epochs']} loss {total / len(y):.4f}", flush=True)
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def model(verbose: bool = True) -> DigitsCNN:
    """The trained CNN (eval mode): trained on first use, then read from the cache."""
    path = _cache_path()
    net = DigitsCNN()
    if path.exists():
        net.load_state_dict(torch.load(path, weights_only=True))
        return net.eval()
    if verbose:
        print(f"training the bundled digits CNN (first run; cached at {path})", flush=True)
    net = train(verbose)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(net.state_dict(), tmp)
    os.replace(tmp, path)
    return net


model.example_input_shape = INPUT_SHAPE  # type: ignore[attr-defined]


def test_data() -> tuple[np.ndarray, np.ndarray]:
    _, _, test_x, test_y = load_split()
    return test_x, test_y
