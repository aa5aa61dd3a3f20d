"""Tucker-2 of a conv kernel over its channel modes (Kim et al. 2016; docs/methods.md#tucker2).

K ~= G x1 U_T x2 U_S, computed by tensorly's `partial_tucker` (HOOI, HOSVD init). Layers:
1x1 (S->R_S) -> core conv (R_S->R_T, original kernel, stride, padding, dilation) -> 1x1
(R_T->T, bias). Only the core conv pads; the first 1x1 has no bias, so it stays exact (docs/methods.md#pitfalls).
Grouped convs are decomposed per group into three grouped convs (verified exact, docs/methods.md#tucker2); the
ranks (R_T, R_S) are per group. Works for 1-D and 2-D convs.
"""
from __future__ import annotations

import warnings

import numpy as np
import tensorly as tl
from tensorly.decomposition import partial_tucker

from tensorfold.ir.errors import PipelineError
from tensorfold.ir.specs import Conv, Spec

from ._common import (NotFactorable, gram_svd, as_bias, as_weight, check_rank, group_kernels, no_padding,
                      ones, stack_groups)


def tucker2_factors(kernel: np.ndarray, ranks: tuple[int, int], n_iter_max: int = 100,
                    tol: float = 1e-8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(core, U_T, U_S) of a (T, S, *k) kernel in float64; core: (R_T, R_S, *k).

    tensorly 0.9+ returns ((core, factors), errors) from partial_tucker (docs/methods.md#tucker2).
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    with tl.backend_context("numpy"), warnings.catch_warnings():
        # tensorly warns when a rank exceeds a narrow unfolding's side and clamps it; max ranks already bound that
        warnings.simplefilter("ignore", UserWarning)
        (core, (u_out, u_in)), _ = partial_tucker(kernel, rank=list(ranks), modes=[0, 1], init="svd", svd=gram_svd,
                                                 n_iter_max=n_iter_max, tol=tol)
    return np.asarray(core), np.asarray(u_out), np.asarray(u_in)


def check_tucker2(spec: Spec) -> str | None:
    """Why `spec` cannot be Tucker-2 factored, or None if it can."""
    if not isinstance(spec, Conv):
        return f"tucker2 factors convs, not {type(spec).__name__}"
    if spec.is_depthwise or spec.weight.shape[1] == 1:
        return "depthwise conv (one input channel per group), nothing to factor"
    return None


def tucker2_max_ranks(conv: Conv) -> tuple[int, int]:
    """(R_T, R_S) bounds per group: R_T <= min(T, S*k^2), R_S <= min(S, T*k^2) (docs/methods.md#pitfalls)."""
    per_out, per_in = conv.out_channels // conv.groups, conv.weight.shape[1]
    taps = int(np.prod(conv.kernel_size))
    return min(per_out, per_in * taps), min(per_in, per_out * taps)


def tucker2_params(conv: Conv, ranks: tuple[int, int]) -> int:
    """S*R_S + k^2*R_S*R_T + T*R_T summed over groups (bias excluded, docs/methods.md#tucker2)."""
    rank_out, rank_in = ranks
    taps = int(np.prod(conv.kernel_size))
    per_out, per_in = conv.out_channels // conv.groups, conv.weight.shape[1]
    return conv.groups * (per_in * rank_in + taps * rank_in * rank_out + per_out * rank_out)


def _checked(conv: Spec, ranks: tuple[int, int]) -> tuple[int, int]:
    reason = check_tucker2(conv)
    if reason is not None:
        raise NotFactorable(reason)
    if not isinstance(ranks, (tuple, list)) or len(ranks) != 2:
        raise PipelineError(f"tucker2: ranks must be a pair (R_T, R_S), got {ranks!r}")
    bound_out, bound_in = tucker2_max_ranks(conv)
    return check_rank(ranks[0], bound_out, "tucker2 R_T"), check_rank(ranks[1], bound_in, "tucker2 R_S")


def tucker2_realise(conv: Conv, factors: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> list[Spec]:
    """Three grouped convs from per-group (core, U_T, U_S)."""
    dims = conv.spatial_dims
    unit = ones(dims)
    first_weight = stack_groups([u_in.T.reshape(*u_in.T.shape, *unit) for _, _, u_in in factors])
    core_weight = stack_groups([core for core, _, _ in factors])
    last_weight = stack_groups([u_out.reshape(*u_out.shape, *unit) for _, u_out, _ in factors])
    first = Conv(as_weight(first_weight), None, stride=unit, padding=no_padding(dims), dilation=unit,
                 groups=conv.groups)
    middle = Conv(as_weight(core_weight), None, stride=tuple(conv.stride), padding=tuple(conv.padding),
                  dilation=tuple(conv.dilation), groups=conv.groups)
    last = Conv(as_weight(last_weight), as_bias(conv.bias), stride=unit, padding=no_padding(dims),
                dilation=unit, groups=conv.groups)
    return [first, middle, last]


def tucker2_specs(conv: Conv, ranks: tuple[int, int], n_iter_max: int = 100, tol: float = 1e-8) -> list[Spec]:
    """1x1 -> core -> 1x1 factor convs at per-group ranks (R_T, R_S), weights in float32."""
    ranks = _checked(conv, ranks)
    return tucker2_realise(conv, [tucker2_factors(k, ranks, n_iter_max, tol) for k in group_kernels(conv)])


def tucker2_layout(conv: Conv, ranks: tuple[int, int]) -> list[Spec]:
    """Zero-weight specs with the shapes `tucker2_specs` would emit."""
    rank_out, rank_in = _checked(conv, ranks)
    per_out, per_in = conv.out_channels // conv.groups, conv.weight.shape[1]
    zeros = (np.zeros((rank_out, rank_in, *conv.kernel_size)), np.zeros((per_out, rank_out)),
             np.zeros((per_in, rank_in)))
    return tucker2_realise(conv, [zeros] * conv.groups)
