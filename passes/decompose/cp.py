"""CP decomposition of a conv kernel: CP3 and CP4 (docs/methods.md#cp).

CP3 decomposes the (T, S, kh*kw) reshape of the kernel: 1x1 (S->R) -> depthwise kh x kw
(full stride, padding, dilation) -> 1x1 (R->T, bias), the MobileNet block shape. CP4
decomposes the 4-way (T, S, kh, kw) kernel: 1x1 -> depthwise (kh x 1) -> depthwise (1 x kw)
-> 1x1. lambda is folded into the first factor (docs/methods.md#cp). Grouped convs are decomposed per
group (rank per group). CP-ALS runs in float64 (ALS is initialisation dependent and slow;
float32 makes it worse; docs/methods.md#cp) in `cp_als.cp_als_einsum`, tensorly's parafac iteration
without its Khatri-Rao MTTKRP (1.2 GB per sweep on a 512x512x3x3 kernel; see that module).

At the largest rank (`cp_max_rank`) an exact CP is built by slicing instead of ALS: the
result is exact by construction, which ALS on a tensor at its generic rank is not.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from tensorfold.ir.errors import PipelineError
from tensorfold.ir.specs import Conv, Spec

from ._common import (NotFactorable, as_bias, as_weight, check_rank, group_kernels, no_padding,
                      ones, stack_groups)
from .als_einsum import cp_als_einsum

VARIANTS = ("cp3", "cp4")
CPFactors = tuple[np.ndarray, list[np.ndarray]]  # (weights lambda, factor matrices (dim_n, R))


def cp_als(tensor: np.ndarray, rank: int, init: str = "svd", n_iter_max: int = 100, tol: float = 1e-8,
           random_state: int = 0) -> CPFactors:
    """CP-ALS in float64: (lambda, factors with unit columns), factors (dim_n, rank)."""
    if init not in ("svd", "random"):
        raise PipelineError(f"cp: init must be 'svd' or 'random', got {init!r}")
    weights, factors, _ = cp_als_einsum(tensor, rank, init=init, n_iter_max=n_iter_max, tol=tol,
                                        random_state=random_state)
    return weights, factors


def _slice_rank(shape: tuple[int, ...], pair: tuple[int, int]) -> int:
    """Terms of the slice construction over modes `pair`: prod(other dims) * min(d_p, d_q)."""
    p, q = pair
    return math.prod(d for i, d in enumerate(shape) if i not in pair) * min(shape[p], shape[q])


def exact_cp_rank(shape: tuple[int, ...]) -> int:
    """Rank of `exact_cp`'s construction, an upper bound on the CP rank of any tensor of `shape`."""
    return min(_slice_rank(shape, pair) for pair in itertools.combinations(range(len(shape)), 2))


def exact_cp(tensor: np.ndarray) -> CPFactors:
    """An exact CP of `tensor` at rank `exact_cp_rank`: SVD every (p, q) slice.

    Each slice matrix contributes min(d_p, d_q) rank-1 terms u_j s_j v_j^T (x) unit vectors
    of the slice's index in the other modes.
    """
    tensor = np.asarray(tensor, dtype=np.float64)
    shape = tensor.shape
    p, q = min(itertools.combinations(range(len(shape)), 2), key=lambda pair: _slice_rank(shape, pair))
    others = [i for i in range(len(shape)) if i not in (p, q)]
    slices = tensor.transpose(*others, p, q).reshape(-1, shape[p], shape[q])
    left, values, right_t = np.linalg.svd(slices, full_matrices=False)  # (n, dp, m), (n, m), (n, m, dq)
    n_slices, terms = values.shape
    root = np.sqrt(values)
    factors: list[np.ndarray] = [np.empty(0)] * len(shape)
    factors[p] = (left * root[:, None, :]).transpose(1, 0, 2).reshape(shape[p], n_slices * terms)
    factors[q] = (right_t * root[:, :, None]).transpose(2, 0, 1).reshape(shape[q], n_slices * terms)
    slice_index = np.unravel_index(np.repeat(np.arange(n_slices), terms), [shape[i] for i in others])
    for mode, index in zip(others, slice_index):
        factors[mode] = np.eye(shape[mode])[:, index]
    return np.ones(n_slices * terms), factors


def _variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise PipelineError(f"cp: variant must be one of {VARIANTS}, got {variant!r}")
    return variant


def cp_kernel_shape(conv: Conv, variant: str) -> tuple[int, ...]:
    """Shape of one group's tensor that CP decomposes: (T/g, S/g, taps) or (T/g, S/g, kh, kw)."""
    head = (conv.out_channels // conv.groups, conv.weight.shape[1])
    if _variant(variant) == "cp3":
        return (*head, int(np.prod(conv.kernel_size)))
    return (*head, *conv.kernel_size)


def check_cp(spec: Spec, variant: str = "cp3") -> str | None:
    """Why `spec` cannot be CP factored as `variant`, or None if it can."""
    _variant(variant)
    if not isinstance(spec, Conv):
        return f"cp factors convs, not {type(spec).__name__}"
    if spec.is_depthwise or spec.weight.shape[1] == 1:
        return "depthwise conv (one input channel per group), nothing to factor"
    if variant == "cp4" and spec.spatial_dims != 2:
        return "cp4 needs a 2-D conv (use cp3 for 1-D)"
    return None


def cp_max_rank(conv: Conv, variant: str = "cp3") -> int:
    """Largest rank per group: the exact slice-construction rank of the kernel tensor."""
    return exact_cp_rank(cp_kernel_shape(conv, variant))


def cp_params(conv: Conv, rank: int, variant: str = "cp3") -> int:
    """R(S + k^2 + T) for CP3, R(S + kh + kw + T) for CP4 (docs/methods.md#cp), summed over groups, no bias."""
    return conv.groups * rank * sum(cp_kernel_shape(conv, variant))


def _checked(conv: Spec, rank: int, variant: str) -> int:
    reason = check_cp(conv, variant)
    if reason is not None:
        raise NotFactorable(reason)
    return check_rank(rank, cp_max_rank(conv, variant), variant)


def cp_realise(conv: Conv, per_group: list[CPFactors], variant: str) -> list[Spec]:
    """1x1 -> depthwise (one or two) -> 1x1 specs from per-group (lambda, factors)."""
    dims, groups = conv.spatial_dims, conv.groups
    unit, flat = ones(dims), no_padding(dims)
    rank = per_group[0][0].shape[0]
    # lambda goes into the first factor layer (docs/methods.md#cp); factors[1] is the input-channel mode
    first_w = stack_groups([(f[1] * w[None, :]).T.reshape(rank, -1, *unit) for w, f in per_group])
    last_w = stack_groups([f[0].reshape(f[0].shape[0], rank, *unit) for _, f in per_group])
    first = Conv(as_weight(first_w), None, stride=unit, padding=flat, dilation=unit, groups=groups)
    last = Conv(as_weight(last_w), as_bias(conv.bias), stride=unit, padding=flat, dilation=unit, groups=groups)
    if variant == "cp3":
        spatial_w = stack_groups([f[2].T.reshape(rank, 1, *conv.kernel_size) for _, f in per_group])
        middle = [Conv(as_weight(spatial_w), None, stride=tuple(conv.stride), padding=tuple(conv.padding),
                       dilation=tuple(conv.dilation), groups=groups * rank)]
    else:
        (pad_h, pad_w), (s_h, s_w), (d_h, d_w) = conv.padding, conv.stride, conv.dilation
        vertical_w = stack_groups([f[2].T[:, None, :, None] for _, f in per_group])
        horizontal_w = stack_groups([f[3].T[:, None, None, :] for _, f in per_group])
        middle = [Conv(as_weight(vertical_w), None, stride=(s_h, 1), padding=(tuple(pad_h), (0, 0)),
                       dilation=(d_h, 1), groups=groups * rank),
                  Conv(as_weight(horizontal_w), None, stride=(1, s_w), padding=((0, 0), tuple(pad_w)),
                       dilation=(1, d_w), groups=groups * rank)]
    return [first, *middle, last]


def cp_factors(conv: Conv, rank: int, variant: str = "cp3", method: str = "als", **opts) -> list[CPFactors]:
    """Per-group (lambda, [A_T, A_S, spatial factor(s)]) of the conv kernel in float64.

    opts go to `cp_als` (init, n_iter_max, tol, random_state) or, for method="epc", to
    `cp_epc` (those plus epc_iter_max, epc_tol).
    """
    rank = _checked(conv, rank, variant)
    if method not in ("als", "epc"):
        raise PipelineError(f"cp: method must be 'als' or 'epc', got {method!r}")
    shape = cp_kernel_shape(conv, variant)
    tensors = [kernel.reshape(shape) for kernel in group_kernels(conv)]
    if rank == cp_max_rank(conv, variant):
        return [exact_cp(tensor) for tensor in tensors]
    if method == "epc":
        from .cp_epc import cp_epc  # cp_epc builds on cp_als: import here to avoid a cycle
        return [cp_epc(tensor, rank, **opts) for tensor in tensors]
    return [cp_als(tensor, rank, **opts) for tensor in tensors]


def cp_specs(conv: Conv, rank: int, variant: str = "cp3", method: str = "als", **opts) -> list[Spec]:
    """CP3 (3 convs) or CP4 (4 convs) factor specs at `rank` per group, weights in float32."""
    return cp_realise(conv, cp_factors(conv, rank, variant, method, **opts), variant)


def cp_layout(conv: Conv, rank: int, variant: str = "cp3") -> list[Spec]:
    """Zero-weight specs with the shapes `cp_specs` would emit."""
    rank = _checked(conv, rank, variant)
    zeros = (np.zeros(rank), [np.zeros((d, rank)) for d in cp_kernel_shape(conv, variant)])
    return cp_realise(conv, [zeros] * conv.groups, variant)
