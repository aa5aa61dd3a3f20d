"""Truncated SVD of a Linear or conv layer (docs/methods.md#svd).

A Linear W (out x in) becomes Linear(in->r) -> Linear(r->out, bias). A conv is factored
through its im2col unfolding K(1) = K.reshape(T, -1): Conv(S->r, the original kernel,
stride, padding and dilation, no bias) -> 1x1 Conv(r->T, bias). For a 1x1 conv that is the
1x1 -> 1x1 pair of docs/methods.md#svd with the stride (fewer FLOPs) and the padding on the first conv: the
first conv has no bias, so padded positions stay zero and the result is exact (docs/methods.md#pitfalls).
Ranks are per group for grouped convs.
"""
from __future__ import annotations

import numpy as np

from tensorfold.ir.specs import Conv, Linear, Spec

from ._common import (NotFactorable, as_bias, as_weight, check_rank, group_kernels, no_padding,
                      ones, stack_groups)


def svd_factors(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(W1, W2) with matrix ~= W2 @ W1, W1: (rank, in), W2: (out, rank), in float64.

    Balanced split W1 = S^1/2 V^T, W2 = U S^1/2 (docs/methods.md#svd): both factors get the same scale, which
    keeps float32 storage and later fine-tuning well conditioned.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    rank = check_rank(rank, min(matrix.shape), "svd")
    left, values, right_t = np.linalg.svd(matrix, full_matrices=False)
    root = np.sqrt(values[:rank])
    return root[:, None] * right_t[:rank], left[:, :rank] * root[None, :]


def check_svd(spec: Spec) -> str | None:
    """Why `spec` cannot be factored by SVD, or None if it can."""
    if isinstance(spec, Linear):
        return None
    if not isinstance(spec, Conv):
        return f"svd factors Linear and Conv layers, not {type(spec).__name__}"
    if spec.is_depthwise:
        return "depthwise conv: each group is a single filter, nothing to factor"
    if svd_max_rank(spec) <= 1:
        return "each group's weight has rank 1 at most, nothing to factor"
    return None


def svd_max_rank(spec: Linear | Conv) -> int:
    """Largest useful rank, per group: r <= min(in, out) of the (unfolded) matrix (docs/methods.md#pitfalls)."""
    if isinstance(spec, Linear):
        return min(spec.in_features, spec.out_features)
    per_group_in = int(np.prod(spec.weight.shape[1:]))
    return min(spec.out_channels // spec.groups, per_group_in)


def svd_params(spec: Linear | Conv, rank: int) -> int:
    """Weights of the two factors (bias excluded): r(in + out) summed over groups (docs/methods.md#svd)."""
    if isinstance(spec, Linear):
        return rank * (spec.in_features + spec.out_features)
    per_group_in = int(np.prod(spec.weight.shape[1:]))
    return spec.groups * rank * (per_group_in + spec.out_channels // spec.groups)


def _require(spec: Spec) -> None:
    reason = check_svd(spec)
    if reason is not None:
        raise NotFactorable(reason)


def svd_realise(spec: Linear | Conv, firsts: list[np.ndarray], seconds: list[np.ndarray]) -> list[Spec]:
    """Factor specs from per-group W1 (r, in_g) and W2 (out_g, r) matrices."""
    if isinstance(spec, Linear):
        return [Linear(as_weight(firsts[0]), None), Linear(as_weight(seconds[0]), as_bias(spec.bias))]
    dims = spec.spatial_dims
    rank = firsts[0].shape[0]
    first_weight = stack_groups([w.reshape(rank, *spec.weight.shape[1:]) for w in firsts])
    second_weight = stack_groups([w.reshape(w.shape[0], rank, *ones(dims)) for w in seconds])
    first = Conv(as_weight(first_weight), None, stride=tuple(spec.stride), padding=tuple(spec.padding),
                 dilation=tuple(spec.dilation), groups=spec.groups)
    second = Conv(as_weight(second_weight), as_bias(spec.bias), stride=ones(dims),
                  padding=no_padding(dims), dilation=ones(dims), groups=spec.groups)
    return [first, second]


def svd_specs(spec: Linear | Conv, rank: int) -> list[Spec]:
    """The two factor layers of `spec` at `rank` (per group), weights in float32."""
    _require(spec)
    rank = check_rank(rank, svd_max_rank(spec), "svd")
    if isinstance(spec, Linear):
        first, second = svd_factors(spec.weight, rank)
        return svd_realise(spec, [first], [second])
    pairs = [svd_factors(kernel.reshape(kernel.shape[0], -1), rank) for kernel in group_kernels(spec)]
    return svd_realise(spec, [p[0] for p in pairs], [p[1] for p in pairs])


def svd_layout(spec: Linear | Conv, rank: int) -> list[Spec]:
    """Zero-weight specs with the shapes `svd_specs` would emit (to cost a rank cheaply)."""
    _require(spec)
    rank = check_rank(rank, svd_max_rank(spec), "svd")
    groups = 1 if isinstance(spec, Linear) else spec.groups
    in_size = spec.in_features if isinstance(spec, Linear) else int(np.prod(spec.weight.shape[1:]))
    out_size = spec.out_features if isinstance(spec, Linear) else spec.out_channels // groups
    return svd_realise(spec, [np.zeros((rank, in_size))] * groups, [np.zeros((out_size, rank))] * groups)
