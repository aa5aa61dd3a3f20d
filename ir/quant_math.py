"""The arithmetic of linear quantization (ONNX QuantizeLinear / DequantizeLinear semantics)."""
from __future__ import annotations

import numpy as np


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

