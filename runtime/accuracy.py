"""Accuracy and fidelity computed from one engine's own outputs (not from a reference engine's)."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .engines import Runner
from .evaluate import top_k_accuracy

Evaluator = Callable[[np.ndarray, np.ndarray], dict[str, Any]]


def outputs_on(runner: Runner, images: np.ndarray, on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """The first output for every image, run in the runner's fixed batch (the last batch padded)."""
    batch, name, count = runner.batch, runner.input_names[0], len(images)
    chunks = []
    for start in range(0, count, batch):
        chunk = images[start:start + batch]
        if len(chunk) < batch:  # built for a fixed batch: pad with copies, drop their outputs
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
        result = runner({name: chunk})
        chunks.append(next(iter(result.values()))[:min(batch, count - start)])
        if on_batch:
            on_batch(start + batch)
    return np.concatenate(chunks)


def classification(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    scores = {"top1": top_k_accuracy(logits, labels, 1)}
    if logits.shape[1] > 5:
        scores["top5"] = top_k_accuracy(logits, labels, 5)
    return scores


def fidelity(outputs: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Top-1 agreement and per-sample relative error ||y - y_ref|| / ||y_ref|| (max and mean)."""
    outputs = outputs.reshape(len(outputs), -1).astype(np.float64)
    reference = reference.reshape(len(reference), -1).astype(np.float64)
    error = np.linalg.norm(outputs - reference, axis=1) / np.maximum(np.linalg.norm(reference, axis=1), 1e-30)
    return {"top1_agreement": float(np.mean(outputs.argmax(1) == reference.argmax(1))),
            "max_rel_error": float(error.max()), "mean_rel_error": float(error.mean())}
