"""Accuracy of a graph on labelled data, computed from the graph's own outputs."""
from __future__ import annotations

import numpy as np

from tensorfold.ir.errors import InputShapeError
from tensorfold.ir.graph import Graph


def predict(graph: Graph, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The first output of `graph` on `images`, in batches (one at a time if the graph's batch is fixed)."""
    name = graph.inputs[0].name
    try:
        chunks = [graph.run({name: images[i:i + batch_size]})[graph.output_names[0]]
                  for i in range(0, len(images), batch_size)]
    except Exception:  # noqa: BLE001 - a graph exported with a static batch of 1
        fixed = graph.inputs[0].shape[0]
        if fixed == batch_size:
            raise
        if len(images) % fixed:
            raise InputShapeError(f"{graph.source}: the graph's batch is fixed at {fixed}; "
                                  f"{len(images)} images do not split into such batches") from None
        chunks = [graph.run({name: images[i:i + fixed]})[graph.output_names[0]] for i in range(0, len(images), fixed)]
    return np.concatenate(chunks)


def top_k_accuracy(logits: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    top = np.argsort(-logits, axis=1)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


def classification_accuracy(graph: Graph, images: np.ndarray, labels: np.ndarray) -> float:
    return top_k_accuracy(predict(graph, images), labels, 1)
