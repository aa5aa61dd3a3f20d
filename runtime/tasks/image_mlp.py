"""`image-mlp`: a coordinate MLP fitted to a photograph (a NeRF-style signal network), scored in PSNR.

The photograph is scikit-image's `camera` (shipped inside the package, never downloaded), averaged
down to 256 x 256 grey values in [0, 1]. A pixel's input is the Fourier-feature encoding of its
(x, y) in [-1, 1]^2 (Tancik et al. 2020): [sin(2 pi B v), cos(2 pi B v)] with a fixed seeded
B ~ N(0, 10^2) of 128 frequencies, so 256 inputs; the encoding is part of the data, as NeRF's
positional encoding is, and the network is pure Linear + ReLU: 256 -> 8 x 256 -> 1.
Training and test data are the same pixels: the task is to represent this one image; its metric is
the PSNR of the whole reconstructed image (peak 1). Inference runs on batches of pixel coordinates.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .evaluators import image_psnr
from .task import Split, Task, TaskError

SIDE = 256
FREQUENCIES, SCALE = 128, 10.0
WIDTH, HIDDEN = 256, 8
# Adam with one cycle, 40 epochs of 16 batches of 4096 pixels (640 steps): ~29 dB after 200 steps at a
# constant lr, more with the cycle; the recipe's budget is the 5 minutes a task may take on 2 cores.
RECIPE = {"version": 1, "seed": 0, "epochs": 40, "lr": 2e-3, "batch": 4096, "optimizer": "adam",
          "schedule": "onecycle", "threads": 2, "loss": "mse", "side": SIDE, "frequencies": FREQUENCIES,
          "scale": SCALE}


class CoordinateMLP(nn.Module):
    """Encoded (x, y) -> grey value: Linear(256, 256) and 7 more hidden Linear(256, 256), ReLU, then Linear(256, 1)."""

    def __init__(self) -> None:
        super().__init__()
        sizes = [2 * FREQUENCIES] + [WIDTH] * HIDDEN
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.out = nn.Linear(WIDTH, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.out(x)


def photograph(side: int = SIDE) -> np.ndarray:
    """The camera image as (side, side) float32 grey values in [0, 1] (side divides 512)."""
    try:
        from skimage import data
    except ImportError as e:
        raise TaskError(f"the image-mlp task needs scikit-image (a tensorfold dependency): pip install scikit-image "
                        f"({e})") from e
    image = data.camera().astype(np.float64) / 255.0
    factor = image.shape[0] // side
    return image.reshape(side, factor, side, factor).mean(axis=(1, 3)).astype(np.float32)


def encode(side: int = SIDE) -> np.ndarray:
    """(side * side, 2 * FREQUENCIES) Fourier features of the pixel centres, row-major."""
    axis = (np.arange(side) + 0.5) / side * 2 - 1
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    coords = np.stack([xx.ravel(), yy.ravel()], axis=1)
    b = np.random.default_rng(RECIPE["seed"]).normal(0, SCALE, (2, FREQUENCIES))
    angles = 2 * np.pi * coords @ b
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


def as_image(outputs: np.ndarray, side: int = SIDE) -> np.ndarray:
    """The network's outputs for all pixels back as a (side, side) image, clipped to [0, 1]."""
    return np.clip(np.asarray(outputs, np.float32).reshape(side, side), 0, 1)


def load_split(side: int = SIDE) -> Split:
    """Train: all pixels in a seeded order (so the calibration slice spans the image); test: the same
    pixels row-major (so outputs reshape into the image)."""
    x = encode(side)
    y = photograph(side).reshape(-1, 1)
    order = np.random.default_rng(1).permutation(len(y))
    return Split(x[order], y[order], x, y)


def make_task(name: str = "image-mlp", side: int = SIDE, epochs: int = RECIPE["epochs"]) -> Task:
    """The task at another resolution or length (tests use a small one under its own name and cache file)."""
    recipe = {**RECIPE, "side": side, "epochs": epochs, "batch": min(RECIPE["batch"], side * side // 8)}
    return Task(
        name=name,
        description=f"coordinate MLP (Fourier features of (x, y) -> 8 x 256 ReLU -> grey value) fitted to "
                    f"scikit-image's camera photograph at {side} x {side}",
        why="the MLP workflow of NeRF-like models: a regression network whose quality is PSNR, not accuracy",
        factory=CoordinateMLP,
        input_shape=(1, 2 * FREQUENCIES),  # one pixel; inference runs on batches of pixels (any size)
        make_split=lambda: load_split(side),
        recipe=recipe,
        calibration_count=4096,
        evaluator=image_psnr,
        metric="psnr",
        metric_name="PSNR (dB)",
    )


TASK = make_task()
