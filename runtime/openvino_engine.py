"""OpenVINO on the CPU (an optional extra): the candidate's ONNX graph, read and compiled by OpenVINO itself.

Two engines: `openvino-fp32` (INFERENCE_PRECISION_HINT f32) and `openvino`, OpenVINO's own default
precision on this CPU (bf16 where the CPU has AVX512_BF16 or AMX, else f32; the runner reports which).
A QDQ graph (tensorfold's int8 pass) runs in int8 on both: OpenVINO turns each QuantizeLinear /
DequantizeLinear pair into a FakeQuantize and its convolutions and matmuls into u8 x s8 kernels;
the runner counts the compute layers that run in int8. Batch-1 latency settings: PERFORMANCE_HINT
LATENCY (one stream) and INFERENCE_NUM_THREADS the thread count every host engine gets. The model
is compiled for the candidate's fixed input shapes, as TVM's artifact is.
"""
from __future__ import annotations

import importlib.util
import time

import numpy as np

from .engines import EngineFailed, EngineUnavailable, Inputs, Runner, onnx_bytes

DEFAULT, FP32 = "openvino", "openvino-fp32"
ENGINES = (FP32, DEFAULT)
EXTRA = 'pip install -e ".[openvino]"'
MISSING = (f"the OpenVINO engines need the openvino package, which is not installed: {EXTRA} in the tensorfold "
           f"checkout (or pip install 'openvino>=2025.0')")
# the exec graph's layer types that carry a model's multiply-adds
COMPUTE_LAYERS = ("Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul")


def available() -> bool:
    """Whether the openvino package is installed (without importing it)."""
    return importlib.util.find_spec("openvino") is not None


def require():
    """The openvino module, or EngineUnavailable naming the extra to install."""
    try:
        import openvino
    except ImportError as e:
        raise EngineUnavailable(MISSING) from e
    return openvino


def prepare(graph, threads: int, engine: str = DEFAULT) -> Runner:
    if engine not in ENGINES:
        raise EngineUnavailable(f"unknown OpenVINO engine {engine!r}; known: {', '.join(ENGINES)}")
    ov = require()
    model_bytes = onnx_bytes(graph)
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": int(threads)}
    if engine == FP32:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    try:
        core = ov.Core()
        model = core.read_model(model_bytes)
        model.reshape({i.name: list(i.shape) for i in graph.inputs})  # exported graphs have a dynamic batch
        compiled = core.compile_model(model, "CPU", config)
    except Exception as e:  # noqa: BLE001
        raise EngineFailed(f"{graph.source}: OpenVINO cannot compile the model: {e}") from e
    request = compiled.create_infer_request()
    names = [i.name for i in graph.inputs]
    dtypes = {i.name: np.dtype(i.dtype) for i in graph.inputs}
    outputs = list(graph.output_names)
    ports = compiled.outputs

    def run(inputs: Inputs) -> dict[str, np.ndarray]:
        try:
            result = request.infer({n: np.ascontiguousarray(inputs[n], dtype=dtypes[n]) for n in names})
        except Exception as e:  # noqa: BLE001
            raise EngineFailed(f"{graph.source} on {engine}: {e}") from e
        return {name: np.array(result[port]) for name, port in zip(outputs, ports)}

    def make_timer(inputs: Inputs):
        for n in names:  # placed once, as the other engines' timers do: each call times inference alone
            request.set_tensor(n, ov.Tensor(np.ascontiguousarray(inputs[n], dtype=dtypes[n])))

        def once() -> float:
            start = time.perf_counter()
            request.infer()
            return time.perf_counter() - start
        return once

    details = {"precision": compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name(),
               **_int8_layers(compiled)}
    return Runner(engine, run, make_timer, names, {i.name: tuple(i.shape) for i in graph.inputs},
                  int(compiled.get_property("INFERENCE_NUM_THREADS")), details=details)


def _int8_layers(compiled) -> dict[str, int]:
    """How many of the compiled graph's compute layers (conv, matmul) run in int8 (u8/i8 runtime precision)."""
    total = int8 = 0
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" not in info or info["layerType"].astype(str) not in COMPUTE_LAYERS:
            continue
        total += 1
        int8 += "runtimePrecision" in info and info["runtimePrecision"].astype(str) in ("u8", "i8")
    return {"compute_layers": total, "int8_layers": int8}
