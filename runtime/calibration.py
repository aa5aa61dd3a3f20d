"""Calibration data for data-driven passes (int8): whatever a user has, as a list of graph feeds.

Accepted: a list of arrays / tensors / {input: array} dicts, a torch DataLoader (the first
element of each batch is the input), an ImageFolder directory, a `.npy` file holding one
array (N, ...) or a task name (`digits`, `mnist1d-cnn`, ...: its calibration split, a slice
of its training data; the test data stays held out). Every feed is checked against the graph's
inputs, so a wrong shape fails here, naming the input and both shapes.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from tensorfold.ir.errors import InputShapeError
from tensorfold.ir.graph import Graph

from .datasets import DataError, as_array, image_folder
from .tasks import did_you_mean, get_task, is_task, task_names

BATCH = 32          # feeds are batches: calibration ranges are per tensor, so the split does not matter


def calibration_feeds(data: Any, graph: Graph, limit: int | None = None) -> list[dict[str, np.ndarray]]:
    names = [info.name for info in graph.inputs]
    what = _describe(data)
    if isinstance(data, (str, os.PathLike)):
        arrays = _from_path(os.fspath(data), graph)
        feeds = [{names[0]: batch} for batch in _batches(arrays)]
    elif hasattr(data, "__iter__") and hasattr(data, "batch_size") and hasattr(data, "dataset"):  # a DataLoader
        feeds = [{names[0]: as_array(batch[0] if isinstance(batch, (tuple, list)) else batch)} for batch in data]
    elif isinstance(data, (list, tuple)):
        feeds = [{k: as_array(v) for k, v in item.items()} if isinstance(item, dict) else {names[0]: as_array(item)}
                 for item in data]
    elif isinstance(data, np.ndarray) or hasattr(data, "detach"):
        feeds = [{names[0]: batch} for batch in _batches(as_array(data))]
    else:
        raise DataError(f"calibration data of type {type(data).__name__} is not supported: give a list of arrays, "
                        "a DataLoader, an ImageFolder directory, a .npy file or a task name")
    if limit:
        feeds = feeds[:limit]
    if not feeds:
        raise DataError(f"calibration data {what} is empty: int8 ranges need at least one input")
    if len(names) > 1 and any(set(f) != set(names) for f in feeds):
        raise DataError(f"calibration data {what}: the graph has inputs {names}; give each item as a dict of them")
    feeds = [{k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in f.items()} for f in feeds]
    for feed in feeds:
        try:
            graph.check_inputs(feed)
        except InputShapeError as e:
            raise InputShapeError(f"calibration data {what}: {e}") from None
    return feeds


def _from_path(path: str, graph: Graph) -> np.ndarray:
    if is_task(path):  # before paths, as `digits` always was
        return get_task(path).calibration_data()
    if os.path.isdir(path):
        return image_folder(path, graph.inputs[0].shape)[0]
    if path.lower().endswith(".npy"):
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file")
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DataError(f"{path}: not a readable .npy array: {e}") from None
    raise DataError(f"calibration data {path!r}{did_you_mean(path)}: expected a task ({', '.join(task_names())}), "
                    "an ImageFolder directory or a .npy file")


def _batches(array: np.ndarray) -> list[np.ndarray]:
    return [array[i:i + BATCH] for i in range(0, len(array), BATCH)]



def _describe(data: Any) -> str:
    if isinstance(data, (str, os.PathLike)):
        return repr(os.fspath(data))
    return f"({type(data).__name__})"
