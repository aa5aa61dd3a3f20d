"""Spatial SVD of a kh x kw conv into (kh x 1) then (1 x kw) convs (Jaderberg 2014; docs/methods.md#spatial_svd).

M = K.transpose(1,2,0,3).reshape(S*kh, T*kw) ~= V H^T at rank r. The first conv carries the
vertical half of stride, padding and dilation, the second the horizontal half; the split is
exact with dilation and with asymmetric (begin, end) padding too, because the first conv has
no bias: zero rows padded before it stay zero after it (docs/methods.md#pitfalls). Ranks are per group; a
depthwise kernel factors into a separable kernel pair.
"""
from __future__ import annotations

import numpy as np

from tensorfold.ir.specs import Conv, Spec

from ._common import NotFactorable, as_bias, as_weight, check_rank, group_kernels, stack_groups
from .svd import svd_factors


def check_spatial_svd(spec: Spec) -> str | None:
    """Why `spec` cannot be split spatially, or None if it can."""
    if not isinstance(spec, Conv) or spec.spatial_dims != 2:
        return "spatial svd needs a 2-D conv"
    if min(spec.kernel_size) == 1:
        return f"kernel {spec.kernel_size} is already separable, nothing to factor"
    return None


def spatial_svd_max_rank(conv: Conv) -> int:
    """Largest useful rank per group: min(S/g * kh, T/g * kw)."""
    kh, kw = conv.kernel_size
    return min(conv.weight.shape[1] * kh, conv.out_channels // conv.groups * kw)


def spatial_svd_params(conv: Conv, rank: int) -> int:
    """Weights of the two factors: r(S*kh + T*kw), bias excluded (summed over groups)."""
    kh, kw = conv.kernel_size
    return rank * (conv.in_channels * kh + conv.out_channels * kw)


def _require(conv: Spec) -> None:
    reason = check_spatial_svd(conv)
    if reason is not None:
        raise NotFactorable(reason)


def _realise(conv: Conv, verticals: list[np.ndarray], horizontals: list[np.ndarray]) -> list[Spec]:
    """Factor convs from per-group V (S/g*kh, r) and H^T (r, T/g*kw)."""
    kh, kw = conv.kernel_size
    per_in, per_out = conv.weight.shape[1], conv.out_channels // conv.groups
    rank = verticals[0].shape[1]
    first_weight = stack_groups([v.reshape(per_in, kh, rank).transpose(2, 0, 1)[..., None] for v in verticals])
    second_weight = stack_groups([h.T.reshape(per_out, kw, rank).transpose(0, 2, 1)[:, :, None, :]
                                  for h in horizontals])
    (pad_h, pad_w), (s_h, s_w), (d_h, d_w) = conv.padding, conv.stride, conv.dilation
    first = Conv(as_weight(first_weight), None, stride=(s_h, 1), padding=(tuple(pad_h), (0, 0)),
                 dilation=(d_h, 1), groups=conv.groups)
    second = Conv(as_weight(second_weight), as_bias(conv.bias), stride=(1, s_w),
                  padding=((0, 0), tuple(pad_w)), dilation=(1, d_w), groups=conv.groups)
    return [first, second]


def spatial_svd_specs(conv: Conv, rank: int) -> list[Spec]:
    """(kh x 1) conv -> (1 x kw) conv with bias, at `rank` per group, weights in float32."""
    _require(conv)
    rank = check_rank(rank, spatial_svd_max_rank(conv), "spatial_svd")
    verticals, horizontals = [], []
    for kernel in group_kernels(conv):
        per_out, per_in, kh, kw = kernel.shape
        matrix = kernel.transpose(1, 2, 0, 3).reshape(per_in * kh, per_out * kw)
        horizontal, vertical = svd_factors(matrix, rank)  # matrix ~= vertical @ horizontal
        verticals.append(vertical)
        horizontals.append(horizontal)
    return _realise(conv, verticals, horizontals)


def spatial_svd_layout(conv: Conv, rank: int) -> list[Spec]:
    """Zero-weight specs with the shapes `spatial_svd_specs` would emit."""
    _require(conv)
    rank = check_rank(rank, spatial_svd_max_rank(conv), "spatial_svd")
    kh, kw = conv.kernel_size
    per_in, per_out = conv.weight.shape[1], conv.out_channels // conv.groups
    return _realise(conv, [np.zeros((per_in * kh, rank))] * conv.groups,
                    [np.zeros((rank, per_out * kw))] * conv.groups)
