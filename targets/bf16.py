"""bf16 convolutions on Intel AMX (`tdpbf16ps`) in an fp32 network: the `precision="bf16"` build.

The build blocks the fp32 network by 32 channels (float_layout.block_convs with 32 lanes: AMX's bf16
A tile row is 32 channels, and two 16-channel C tiles fill a 32-channel output block), so each conv
with whole 32-channel input blocks is rewritten here as

    data   NCHW32c fp32 -> bf16 (rounded to nearest even), padded        fused into the producer's kernel
    kernel (O/16, C/32, KH, KW, 16, 32) bf16 in AMX tile order            re-laid once, at build time
    out    NCHW32c fp32                                                   amx.conv2d_primfunc(AMX_BF16, 32)

and no activation changes layout between two bf16 convs (a 16-channel block would need a re-blocking
gather before each conv: measured 100-165 us per 64x56x56 tensor, against 10 for an elementwise pass).
Only the conv's multiplications see bfloat16 (8 bits of mantissa); its sums, the bias, the activations
between convs, pooling and the classifier stay fp32, as in OpenVINO's bf16 mode. The convs left fp32
(blocked by 32): the RGB stem (3 channels), depthwise and grouped convs. The output error this costs
is measured by the build on random inputs (the manifest's `bf16.error`), and on a trained task by
`tensorfold measure` (docs/architecture.md).
"""
from __future__ import annotations

import numpy as np

from .float_layout import conv2d_calls, rewrite_pass
from .int8.amx import AMX_BF16, BF16_OUT, tile_kernel

BLOCK = 32  # channels per block of the bf16 build's network (see above)


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
    """The fp32 OIHW weight of a conv blocked by 32 (NCHW32c, OIHW32i32o, groups 1); None for any other conv."""
    attrs = call.attrs
    if (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout)) != (
            f"NCHW{BLOCK}c", f"OIHW{BLOCK}i{BLOCK}o", f"NCHW{BLOCK}c") or int(attrs.groups) != 1:
        return None
    blocks = weight.value.numpy()
    if blocks.dtype != np.float32:
        return None
    ob, cb, kh, kw, ib, lanes = blocks.shape
    return np.ascontiguousarray(blocks.transpose(0, 5, 1, 4, 2, 3).reshape(ob * lanes, cb * ib, kh, kw))


def _amx_conv(data, kernel: np.ndarray, attrs):
    import ml_dtypes
    from tvm import relax

    x = relax.op.astype(data, "bfloat16")
    top, left, bottom, right = (int(p) for p in attrs.padding)
    if top or left or bottom or right:
        x = relax.op.nn.pad(x, [0, 0, 0, 0, top, bottom, left, right, 0, 0])
    tiles = tile_kernel(kernel.astype(ml_dtypes.bfloat16), AMX_BF16)
    return relax.op.nn.conv2d(x, relax.const(tiles), strides=attrs.strides, padding=[0, 0, 0, 0],
                              dilation=attrs.dilation, data_layout=AMX_BF16.data, kernel_layout=AMX_BF16.kernel,
                              out_layout=BF16_OUT, out_dtype="float32")


def _count(mod) -> int:
    return len(conv2d_calls(mod, lambda call: str(call.attrs.data_layout) == AMX_BF16.data
                            and str(call.args[0].ty.dtype) == "bfloat16"))
