"""A model named on the command line -> Graph.

MODEL is an `.onnx` file, a torchvision architecture (`torchvision:resnet18`, random
weights unless `weights=` names a state-dict file), a Python factory
`package.module:function` returning an `nn.Module`, or a trained task (`digits`,
`mnist1d-cnn`, ...: `tensorfold tasks`), trained on first use and captured with its input shape.
"""
from __future__ import annotations

import importlib
import os
from typing import Sequence

import torch

from tensorfold.ir import Graph, capture, load
from tensorfold.ir.errors import CaptureError, InputShapeError
from tensorfold.runtime.tasks import did_you_mean, get_task, is_task, task_names

# The old spelling of the digits task, still accepted wherever a task name is.
EXAMPLES = {"digits": "tensorfold.examples.digits:model"}
DEFAULT_IMAGE_SHAPE = (1, 3, 224, 224)


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise InputShapeError(f"--input-shape {text!r}: expected comma-separated positive integers, e.g. 1,3,224,224") from None
    if not shape or any(d <= 0 for d in shape):
        raise InputShapeError(f"--input-shape {text!r}: expected comma-separated positive integers, e.g. 1,3,224,224")
    return shape


def task_name(model: object) -> str | None:
    """The task a model name stands for (`digits` also as its old factory path), else None."""
    if not isinstance(model, str):
        return None
    if model in EXAMPLES.values():
        model = next(name for name, path in EXAMPLES.items() if path == model)
    return model if is_task(model) else None


def resolve(model: str, input_shape: Sequence[int] | None = None, weights: str | None = None) -> Graph:
    if is_task(model):  # a task name wins over a file of that name (as `digits` always did): write ./name
        return _task_graph(model, input_shape, weights)
    if model.lower().endswith(".onnx") or os.path.isfile(model):
        if weights:
            raise CaptureError(f"{model}: --weights applies to torch models, not to an ONNX file")
        graph = load(model)
        if input_shape is not None:
            graph = load(model, input_shapes={graph.inputs[0].name: input_shape})
        return graph
    module, default_shape, source = _torch_module(model)
    if weights:
        _load_weights(module, weights, source)
    shape = tuple(input_shape or default_shape)
    return capture(module, (torch.randn(*shape),), source=source)


def _torch_module(model: str) -> tuple[torch.nn.Module, tuple[int, ...], str]:
    if model.startswith("torchvision:"):
        import torchvision

        arch = model.split(":", 1)[1]
        try:
            module = torchvision.models.get_model(arch, weights=None)
        except ValueError:
            known = ", ".join(sorted(torchvision.models.list_models(module=torchvision.models)))
            raise CaptureError(f"{model}: torchvision has no classification model {arch!r}; known: {known}") from None
        return module.eval(), DEFAULT_IMAGE_SHAPE, model
    if ":" in model:
        path, _, attr = model.partition(":")
        try:
            factory = getattr(importlib.import_module(path), attr)
        except (ImportError, AttributeError) as e:
            raise CaptureError(f"{model}: cannot import factory {attr!r} from module {path!r}: {e}") from e
        module = factory()
        if not isinstance(module, torch.nn.Module):
            raise CaptureError(f"{model}: the factory returned {type(module).__name__}, not a torch.nn.Module")
        shape = getattr(factory, "example_input_shape", None) or getattr(module, "example_input_shape", None)
        return module, tuple(shape or DEFAULT_IMAGE_SHAPE), model
    raise CaptureError(
        f"{model!r}: not a model{did_you_mean(model)}; give an .onnx file, torchvision:<arch>, a factory "
        f"package.module:function, or a trained task ({', '.join(task_names())}; `tensorfold tasks`)")


def _task_graph(name: str, input_shape: Sequence[int] | None, weights: str | None) -> Graph:
    task = get_task(name)
    module = task.model()
    if weights:
        _load_weights(module, weights, name)
    shape = tuple(input_shape or task.input_shape)
    return capture(module, (torch.randn(*shape),), source=name)


def _load_weights(module: torch.nn.Module, weights: str, source: str) -> None:
    if not os.path.isfile(weights):
        raise CaptureError(f"--weights {weights}: no such file")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        module.load_state_dict(state)
    except Exception as e:  # noqa: BLE001
        raise CaptureError(f"--weights {weights}: cannot load it as a state dict of {source}: {e}") from e
