"""torch eager: a captured FX graph run as its nn.Module (ONNX graphs stay ONNX: not available)."""
from __future__ import annotations

import time

import numpy as np

from .engines import EngineUnavailable, Inputs, Runner

NAME = "torch"


def prepare(graph, threads: int) -> Runner:
    import torch

    if graph is None:
        raise EngineUnavailable("an artifact alone has no torch module")
    try:
        module = graph.to_torch()
    except Exception as e:  # noqa: BLE001 - the ONNX adapter refuses by design
        raise EngineUnavailable(f"{graph.source} is an ONNX graph (no torch round trip)") from e
    module = module.eval()
    torch.set_num_threads(threads)
    names = [i.name for i in graph.inputs]
    outputs = list(graph.output_names)

    def run(inputs: Inputs) -> dict[str, np.ndarray]:
        with torch.no_grad():
            result = module(*[torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in names])
        leaves = torch.utils._pytree.tree_leaves(result)
        return {name: leaf.detach().numpy().copy() for name, leaf in zip(outputs, leaves)}

    def make_timer(inputs: Inputs):
        args = [torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in names]

        def once() -> float:
            with torch.no_grad():
                start = time.perf_counter()
                module(*args)
                return time.perf_counter() - start
        return once

    return Runner(NAME, run, make_timer, names, {i.name: tuple(i.shape) for i in graph.inputs}, threads)
