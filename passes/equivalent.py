"""The dense weight a chain of linear layers computes, for the report's relative weight error.

A chain of convs run with stride 1, no padding and no dilation is one conv whose kernel is
the composition of the chain's kernels; stride, padding and dilation sit on one spatial
factor only (docs/methods.md#pitfalls), so comparing these dense kernels compares the layers.
Grouped and depthwise kernels are expanded to block-diagonal dense ones first.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from tensorfold.ir.specs import Conv, Linear, Spec, TTLinear


def _dense_conv(conv: Conv) -> np.ndarray:
    """(T, S, *k) with zeros outside each group's block."""
    weight = conv.weight.astype(np.float64)
    t, s_per = weight.shape[:2]
    g = conv.groups
    dense = np.zeros((t, s_per * g, *weight.shape[2:]))
    t_per = t // g
    for group in range(g):
        dense[group * t_per:(group + 1) * t_per, group * s_per:(group + 1) * s_per] = weight[group * t_per:(group + 1) * t_per]
    return dense


def _compose(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Kernel of `second` applied after `first` (both (out, in, *k), correlation, stride 1)."""
    spatial_first, spatial_second = first.shape[2:], second.shape[2:]
    out_shape = (second.shape[0], first.shape[1], *[a + b - 1 for a, b in zip(spatial_first, spatial_second)])
    result = np.zeros(out_shape)
    for offset in np.ndindex(*spatial_second):
        window = tuple(slice(o, o + n) for o, n in zip(offset, spatial_first))
        # tensordot is one BLAS GEMM; the equivalent einsum loops in C, minutes on CP's (R, R, k, k) middles
        result[(slice(None), slice(None), *window)] += np.tensordot(
            second[(slice(None), slice(None), *offset)], first, axes=(1, 0))
    return result


def _tt_dense(spec: TTLinear) -> np.ndarray:
    """(out, in) matrix of a TT-matrix: contract the cores over their bond ranks."""
    full = spec.cores[0].astype(np.float64)  # (1, m1, n1, r1)
    for core in spec.cores[1:]:
        r0, m_acc, n_acc, _ = full.shape
        full = np.einsum("amnr,rpqs->ampnqs", full, core.astype(np.float64))
        full = full.reshape(r0, m_acc * core.shape[1], n_acc * core.shape[2], core.shape[3])
    return full[0, :, :, 0]


def dense_weight(specs: Sequence[Spec]) -> np.ndarray:
    """The single dense weight of a chain of Conv / Linear / TTLinear specs (biases ignored)."""
    total = None
    for spec in specs:
        if isinstance(spec, Conv):
            dense = _dense_conv(spec)
        elif isinstance(spec, Linear):
            dense = spec.weight.astype(np.float64)
        elif isinstance(spec, TTLinear):
            dense = _tt_dense(spec)
        else:
            raise TypeError(f"no dense weight for a {type(spec).__name__} spec")
        total = dense if total is None else _compose(total, dense)
    return total


def weight_error(original: Spec, factors: Sequence[Spec]) -> float:
    reference = dense_weight([original])
    approx = dense_weight(factors)
    return float(np.linalg.norm(reference - approx) / max(np.linalg.norm(reference), 1e-30))
