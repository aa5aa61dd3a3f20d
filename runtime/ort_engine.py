"""onnxruntime on the CPU: ONNX graphs as they are, torch graphs exported to a temporary .onnx first."""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from .engines import EngineFailed, EngineUnavailable, Inputs, Runner

NAME = "onnxruntime"


def _onnx_bytes(graph) -> bytes:
    to_onnx = getattr(graph, "to_onnx", None)
    if to_onnx is not None:
        return to_onnx().SerializeToString()
    with tempfile.TemporaryDirectory(prefix="tensorfold-ort-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        graph.save(path)
        with open(path, "rb") as f:
            return f.read()


def prepare(graph, threads: int) -> Runner:
    import onnxruntime as ort

    if graph is None:
        raise EngineUnavailable("an artifact alone has no ONNX model")
    try:
        model = _onnx_bytes(graph)
    except Exception as e:  # noqa: BLE001
        raise EngineUnavailable(f"{graph.source}: export to ONNX failed: {e}") from e
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise EngineFailed(f"{graph.source}: onnxruntime cannot load the model: {e}") from e
    names = [i.name for i in session.get_inputs()]
    outputs = list(graph.output_names)
    shapes = {i.name: tuple(i.shape) for i in graph.inputs}

    def run(inputs: Inputs) -> dict[str, np.ndarray]:
        values = session.run(None, {n: np.ascontiguousarray(inputs[n]) for n in names})
        return dict(zip(outputs, values))

    def make_timer(inputs: Inputs):
        feeds = {n: np.ascontiguousarray(inputs[n]) for n in names}

        def once() -> float:
            start = time.perf_counter()
            session.run(None, feeds)
            return time.perf_counter() - start
        return once

    return Runner(NAME, run, make_timer, names, shapes, threads)
