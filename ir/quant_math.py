"""The arithmetic of linear quantization (ONNX QuantizeLinear / DequantizeLinear semantics)."""
from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _range(dtype: np.dtype) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int = 1) -> np.ndarray:
    """QuantizeLinear: saturate(round_half_even(x / scale) + zero_point) in zero_point's integer type."""
    zero_point = np.asarray(zero_point)
    scale, zp = _per_axis(np.asarray(scale), x.ndim, axis), _per_axis(zero_point, x.ndim, axis)
    low, high = _range(zero_point.dtype)
    return np.clip(np.rint(x / scale) + zp.astype(np.int64), low, high).astype(zero_point.dtype)


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None = None, axis: int = 1) -> np.ndarray:
    """DequantizeLinear: (q - zero_point) * scale, float32."""
    scale = np.asarray(scale, np.float32)
    zp = np.zeros_like(scale, np.int64) if zero_point is None else np.asarray(zero_point).astype(np.int64)
    shifted = q.astype(np.int64) - _per_axis(zp, q.ndim, axis)
    return (shifted.astype(np.float32) * _per_axis(scale, q.ndim, axis)).astype(np.float32)


def fake_quant(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """What the int8 arithmetic sees of a float tensor: quantize then dequantize (per tensor)."""
    return dequantize(quantize(x, scale, zero_point), scale, zero_point)


def _per_axis(values: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    if values.ndim == 0 or values.size == 1:
        return values.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = values.size
    return values.reshape(shape)


def fold_dequantize(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where every DequantizeLinear of constants (weights, biases) is replaced by its float value.

    Layers then read as float layers with the exact values the int8 kernels use.
    """
    model = copy.deepcopy(model)
    constants = {t.name: t for t in model.graph.initializer}
    kept = []
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and all(i in constants for i in node.input if i):
            arrays = [numpy_helper.to_array(constants[i]) if i else None for i in node.input]
            axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1)
            value = dequantize(arrays[0], arrays[1], arrays[2] if len(arrays) > 2 else None, axis)
            tensor = numpy_helper.from_array(value, node.output[0])
            model.graph.initializer.append(tensor)
            constants[node.output[0]] = tensor
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model
