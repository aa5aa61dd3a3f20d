"""Task evaluators: (outputs, labels) -> {metric: value}; a regression task (PSNR) plugs in the same way."""
from __future__ import annotations

from typing import Callable

import numpy as np

Evaluator = Callable[[np.ndarray, np.ndarray], dict[str, float]]


def top1(outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1 accuracy of logits (N, classes) against integer labels (N,)."""
    return {"top1": float(np.mean(np.argmax(outputs, axis=1) == labels))}


def psnr(outputs: np.ndarray, targets: np.ndarray, peak: float = 1.0) -> dict[str, float]:
    """Mean PSNR in dB over samples, for image-to-image tasks whose values span `peak`."""
    errors = (np.asarray(outputs, np.float64) - np.asarray(targets, np.float64)).reshape(len(outputs), -1)
    mse = np.maximum(np.mean(errors ** 2, axis=1), 1e-20)
    return {"psnr": float(np.mean(10.0 * np.log10(peak ** 2 / mse)))}


def image_psnr(outputs: np.ndarray, targets: np.ndarray, peak: float = 1.0) -> dict[str, float]:
    """PSNR in dB of one signal spread over the rows (an image's pixels): one MSE over every value,
    outputs clipped to [0, peak] as an image viewer would show them."""
    clipped = np.clip(np.asarray(outputs, np.float64), 0.0, peak)
    mse = max(float(np.mean((clipped - np.asarray(targets, np.float64)) ** 2)), 1e-20)
    return {"psnr": float(10.0 * np.log10(peak ** 2 / mse)), "mse": mse}
