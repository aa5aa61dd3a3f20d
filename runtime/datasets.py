"""Labelled data for the built-in classification evaluator: a task's held-out test set, or an ImageFolder tree."""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from tensorfold.ir.errors import InputShapeError, TensorfoldError

from .tasks import did_you_mean, get_task, is_task, task_names

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp")
# ImageNet statistics: what torchvision classifiers are trained with.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


class DataError(TensorfoldError):
    """Evaluation data is missing or does not fit the model's input."""


def load_data(data: Any, input_shape: Sequence[int], limit: int | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """(images, labels, description). `data`: a task name (its test set), an ImageFolder directory, or (images, labels)."""
    if isinstance(data, tuple) and len(data) == 2:
        labels = np.asarray(data[1])
        # class labels stay integers; float targets (a regression task's) stay floats: casting them to
        # int64 turned every grey value of image-mlp into 0
        labels = labels.astype(np.int64) if labels.dtype.kind in "iub" else labels.astype(np.float32)
        images, what = np.asarray(data[0], np.float32), "given arrays"
    elif is_task(data):  # before folders: `digits` always meant the bundled set (a folder of that name: ./digits)
        images, labels = get_task(data).test_data()
        what = f"{data} test set"
    elif isinstance(data, (str, os.PathLike)) and os.path.isdir(data):
        images, labels = image_folder(os.fspath(data), input_shape)
        what = f"ImageFolder {os.fspath(data)}"
    else:
        hint = did_you_mean(data) if isinstance(data, str) else ""
        raise DataError(f"--data {data!r}{hint}: expected a task ({', '.join(task_names())}) or an ImageFolder "
                        "directory (one sub-folder per class)")
    if limit:
        images, labels = images[:limit], labels[:limit]
    if tuple(images.shape[1:]) != tuple(input_shape[1:]):
        raise InputShapeError(f"{what}: images have shape {images.shape[1:]}, the model takes {tuple(input_shape[1:])}")
    return images, labels, what


def image_folder(root: str, input_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """root/<class>/<image>: classes sorted by name (torchvision's ImageFolder order), resized to H x W."""
    from PIL import Image

    channels, height, width = (int(d) for d in input_shape[1:4])
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise DataError(f"{root}: no class sub-folders (expected {root}/<class>/<image>)")
    images, labels = [], []
    for index, name in enumerate(classes):
        folder = os.path.join(root, name)
        for file in sorted(os.listdir(folder)):
            if not file.lower().endswith(IMAGE_EXTENSIONS):
                continue
            with Image.open(os.path.join(folder, file)) as image:
                image = image.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
                pixels = np.asarray(image, np.float32) / 255.0
            pixels = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
            images.append(_normalize(pixels, channels))
            labels.append(index)
    if not images:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
    return np.stack(images).astype(np.float32), np.asarray(labels, np.int64)


def _normalize(pixels: np.ndarray, channels: int) -> np.ndarray:
    if channels == 3:
        return (pixels - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]
    return (pixels - 0.5) / 0.5  # the digits example's convention


def load_training_data(data: Any, input_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray, str]:
    """(inputs, labels, description) to train on: a task name (its training split, never its test set),
    an ImageFolder directory, (inputs, labels) arrays or tensors, or a torch DataLoader / Dataset of
    (input, label) pairs (read once into memory)."""
    if isinstance(data, tuple) and len(data) == 2 and not isinstance(data[0], (str, os.PathLike)):
        x, y, what = as_array(data[0]), as_array(data[1]), "(given arrays)"
    elif is_task(data):
        x, y = get_task(data).train_data()
        what = f"{data} training split"
    elif isinstance(data, (str, os.PathLike)) and os.path.isdir(data):
        x, y = image_folder(os.fspath(data), input_shape)
        what = f"ImageFolder {os.fspath(data)}"
    elif hasattr(data, "__iter__") and (hasattr(data, "dataset") or hasattr(data, "__getitem__")) \
            and not isinstance(data, (str, os.PathLike, np.ndarray)):
        pairs = list(data)
        if not pairs or not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs):
            raise DataError(f"training data ({type(data).__name__}): expected (input, label) pairs")
        batched = hasattr(data, "batch_size") and getattr(data, "batch_size", None) is not None
        join = np.concatenate if batched else np.stack
        x, y = join([as_array(p[0]) for p in pairs]), join([as_array(p[1]) for p in pairs])
        what = f"({type(data).__name__}, {len(x)} samples)"
    else:
        hint = did_you_mean(data) if isinstance(data, str) else ""
        raise DataError(f"training data {data!r}{hint}: expected a task ({', '.join(task_names())}), an ImageFolder "
                        "directory (one sub-folder per class), (inputs, labels) arrays or a DataLoader")
    x = x.astype(np.float32) if x.dtype.kind == "f" else x
    y = y.astype(np.int64) if y.dtype.kind in "iu" else y.astype(np.float32)
    if tuple(x.shape[1:]) != tuple(input_shape[1:]):
        raise InputShapeError(f"training data {what}: samples have shape {tuple(x.shape[1:])}, the model takes "
                              f"{tuple(input_shape[1:])} (batch first)")
    if len(x) != len(y):
        raise DataError(f"training data {what}: {len(x)} inputs but {len(y)} labels")
    return x, y, what


def as_array(value: Any) -> np.ndarray:
    """A tensor (any device) or array-like as a numpy array."""
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
