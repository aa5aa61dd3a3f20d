"""bf16 convolutions on Intel AMX (`tdpbf16ps`) in an fp32 network: the `precision="bf16"` build.

After float_layout.block_convs the fp32 convs run NCHW16c -> NCHW16c. Each one with whole
32-channel input blocks and 16-channel output blocks is rewritten here as

    data   NCHW16c fp32 -> NCHW32c bf16 (rounded to nearest even), padded     one fused data-movement kernel
    kernel (O/16, C/32, KH, KW, 16, 32) bf16 in AMX tile order                 re-laid once, at build time
    out    NCHW16c fp32                                                        amx.conv2d_primfunc(AMX_BF16)

so only the conv's multiplications see bfloat16 (8 bits of mantissa); its sums, the bias, the
activations between convs, pooling and the classifier stay fp32, as in OpenVINO's bf16 mode.
The convs left fp32: the RGB stem (3 channels), depthwise and grouped convs, and narrow ones.
The output error this costs is measured by the build on random inputs (the manifest's
`bf16.error`), and on a trained task by `tensorfold measure` (docs/architecture.md).
"""
from __future__ import annotations

import numpy as np

from .float_layout import conv2d_calls, rewrite_pass
from .int8.amx import AMX_BF16, tile_kernel


def bf16_convs(mod):
    """`mod` with its blocked fp32 convs that fill whole AMX-BF16 tiles on bf16 inputs; returns (module, count)."""
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, wildcard

    data, weight = wildcard(), is_const()
    conv = is_op("relax.nn.conv2d")(data, weight)
    rewritten = []

    def rewrite(call, matches):
        kernel = _oihw(call, matches[weight])
        if kernel is None:
            return call
        rewritten.append(call)
        return _amx_conv(matches[data], kernel, call.attrs)

    mod = tvm.transform.Sequential([rewrite_pass(conv, rewrite, "Bf16Convs"), relax.transform.FoldConstant()])(mod)
    return mod, _count(mod)


def _oihw(call, weight) -> np.ndarray | None:
    """The fp32 OIHW weight of a blocked conv (NCHW16c, OIHW16i16o, groups 1) whose input channels fill whole
    32-channel blocks; None for any other conv."""
    attrs = call.attrs
    if (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout)) != (
            "NCHW16c", "OIHW16i16o", "NCHW16c") or int(attrs.groups) != 1:
        return None
    blocks = weight.value.numpy()
    if blocks.dtype != np.float32 or blocks.shape[1] % 2:
        return None
    ob, cb, kh, kw, ib, lanes = blocks.shape
    return np.ascontiguousarray(blocks.transpose(0, 5, 1, 4, 2, 3).reshape(ob * lanes, cb * ib, kh, kw))


def _amx_conv(data, kernel: np.ndarray, attrs):
    import ml_dtypes
    from tvm import relax

    n, cb, height, width, _ = (int(d) for d in data.ty.shape)
    # NCHW16c -> NCHW32c: two consecutive 16-channel blocks side by side (reshape + permute: no index
    # arithmetic for the fused kernel to gather with), rounded to bf16, padded with bf16 zeros
    x = relax.op.reshape(data, (n, cb // 2, 2, height, width, 16))
    x = relax.op.reshape(relax.op.permute_dims(x, [0, 1, 3, 4, 2, 5]), (n, cb // 2, height, width, 32))
    x = relax.op.astype(x, "bfloat16")
    top, left, bottom, right = (int(p) for p in attrs.padding)
    if top or left or bottom or right:
        x = relax.op.nn.pad(x, [0, 0, 0, 0, top, bottom, left, right, 0, 0])
    tiles = tile_kernel(kernel.astype(ml_dtypes.bfloat16), AMX_BF16)
    return relax.op.nn.conv2d(x, relax.const(tiles), strides=attrs.strides, padding=[0, 0, 0, 0],
                              dilation=attrs.dilation, data_layout=AMX_BF16.data, kernel_layout=AMX_BF16.kernel,
                              out_layout=AMX_BF16.out, out_dtype="float32")


def _count(mod) -> int:
    return len(conv2d_calls(mod, lambda call: str(call.attrs.data_layout) == AMX_BF16.data
                            and str(call.args[0].ty.dtype) == "bfloat16"))
