"""BN folding as arithmetic on specs (docs/methods.md#fold_bn); no graph here.

With s = gamma / sqrt(var + eps) and t = beta - s * mean, BN(x) = s*x + t per channel.
All products are formed in float64 and the result cast back to float32.
"""
from __future__ import annotations

import numpy as np

from tensorfold.ir.specs import BatchNorm, Conv, ConvTranspose, Linear

Foldable = Conv | ConvTranspose | Linear


def _f32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32)


def fold_after(layer: Foldable, bn: BatchNorm) -> Foldable:
    """layer -> BN  ==>  one layer: W'[o] = s_o W[o], b' = s (b - mean) + beta."""
    scale, shift = bn.scale_shift()
    n_out = layer.out_channels if not isinstance(layer, Linear) else layer.out_features
    bias = np.zeros(n_out) if layer.bias is None else layer.bias.astype(np.float64)
    new_bias = _f32(scale * bias + shift)
    weight = layer.weight.astype(np.float64)
    if isinstance(layer, ConvTranspose):
        # weight (S, T/g, *k): output channel o = group * T/g + j lives at [group block, j]
        g, s_in, t_per = layer.groups, layer.weight.shape[0], layer.weight.shape[1]
        blocks = weight.reshape(g, s_in // g, t_per, *layer.kernel_size)
        per_out = scale.reshape(g, 1, t_per, *([1] * len(layer.kernel_size)))
        new_weight = _f32((blocks * per_out).reshape(weight.shape))
        return ConvTranspose(new_weight, new_bias, layer.stride, layer.padding, layer.output_padding,
                             layer.dilation, layer.groups)
    new_weight = _f32(weight * scale.reshape(-1, *([1] * (weight.ndim - 1))))
    if isinstance(layer, Linear):
        return Linear(new_weight, new_bias)
    return Conv(new_weight, new_bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def fold_before(bn: BatchNorm, layer: Conv | Linear) -> Conv | Linear:
    """BN -> layer  ==>  one layer: W'[:, i] = W[:, i] s_i, b' = b + W t.

    Exact only when the layer adds no zero padding (a padded zero would have been
    BN(x)'s value t, not 0); the caller checks that.
    """
    scale, shift = bn.scale_shift()
    weight = layer.weight.astype(np.float64)
    if isinstance(layer, Linear):
        bias = np.zeros(layer.out_features) if layer.bias is None else layer.bias.astype(np.float64)
        return Linear(_f32(weight * scale[None, :]), _f32(bias + weight @ shift))
    g = layer.groups
    t_out, s_per = weight.shape[0], weight.shape[1]
    # output channel o (group o // (T/g)) reads input channels group * S/g + j through W[o, j]
    group_of_out = np.arange(t_out) // (t_out // g)
    in_index = group_of_out[:, None] * s_per + np.arange(s_per)[None, :]          # (T, S/g)
    spatial = (1,) * (weight.ndim - 2)
    new_weight = weight * scale[in_index].reshape(t_out, s_per, *spatial)
    bias = np.zeros(t_out) if layer.bias is None else layer.bias.astype(np.float64)
    new_bias = bias + np.sum(weight * shift[in_index].reshape(t_out, s_per, *spatial), axis=tuple(range(1, weight.ndim)))
    return Conv(_f32(new_weight), _f32(new_bias), layer.stride, layer.padding, layer.dilation, layer.groups)
