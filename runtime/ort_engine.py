"""onnxruntime on the CPU: ONNX graphs as they are, torch graphs exported to a temporary .onnx first."""
from __future__ import annotations

import time

import numpy as np

from .engines import EngineFailed, Inputs, Runner, onnx_bytes

NAME = "onnxruntime"


def prepare(graph, threads: int) -> Runner:
    import onnxruntime as ort

    model = onnx_bytes(graph)
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
