"""bf16 convolutions in an fp32 network: the `precision="bf16"` build, on AMX or AVX512-BF16.

Only the convs' multiplications see bfloat16 (8 bits of mantissa); their sums, the bias, the
activations between convs, pooling and the classifier stay fp32, as in OpenVINO's bf16 mode. The
build blocks the fp32 network by `route.block` channels (float_layout.block_convs) and rewrites each
conv with whole input blocks (groups 1) as

    data   NCHW{block}c fp32 -> bf16 (rounded to nearest even), padded    fused into the producer's kernel
    kernel bf16, in the instruction's order                               re-laid once, at build time
    out    NCHW{block}c fp32

so no activation changes layout between two bf16 convs. Two routes, by what the CPU has:

- AMX (`AMX`, Intel Xeon from Sapphire Rapids): `tdpbf16ps` on tiles, block 32 (a bf16 A tile row
  is 32 channels; two 16-channel C tiles fill an output block), a fixed TIR kernel
  (int8/amx.py with AMX_BF16); kernel (O/16, C/32, KH, KW, 16, 32). Blocking by 16 instead cost a
  re-blocking gather before each conv: measured 100-165 us per 64x56x56 tensor.
- AVX512-BF16 (`AVX512`, AMD Zen 4 and later, Intel Cooper Lake): `vdpbf16ps` sums 2 bf16 products
  into each of 16 fp32 lanes, the fp32 analogue of VNNI. Block 16; kernel OIHW16o2i
  (O/16, C/2, KH, KW, 16, 2): one instruction multiplies a broadcast input pair by 16 output
  channels' pairs. The conv is a TE compute (`conv2d_te`) that MetaSchedule tiles and tensorizes
  with tuning.intrinsics.BF16_INTRIN.

On AVX512-BF16 a stem whose input is one narrow block (RGB: NCHW3c) runs in bf16 too, its channels
padded to a whole pair (NCHW4c, a zero channel with zero weights): the 3-channel 7x7 stem of ResNet-18
took 1.37 ms in fp32 after 600 trials, 14 % of the bf16 network. The convs left fp32: depthwise and
grouped convs, and on AMX the stem (a tile row is 32 channels). The output error this
costs is measured by the build on random inputs (the manifest's `bf16.error`), and on a trained task
by `tensorfold measure` (docs/architecture.md).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .float_layout import conv2d_calls, rewrite_pass
from .int8.amx import AMX_BF16, AMX_BF16_KERNEL, BF16_FEATURES, BF16_OUT, target_has_amx, tile_kernel
from .registry import cpu_has

DOT_KERNEL = "conv2d_NCHW16c_bf16"  # the AVX512-BF16 route's TIR function (kept in fused task names)
DOT_LAYOUTS = ("NCHW16c", "OIHW16o2i", "NCHW16c")  # its data, kernel and out layouts (a stem's data: NCHW4c)
_BLOCKED = re.compile(r"NCHW(\d+)c")


@dataclass(frozen=True)
class Route:
    name: str
    block: int         # channels per block of the network
    instruction: str   # what multiplies the bf16 pairs
    kernel: str        # the TIR function of a bf16 conv
    tuned: bool        # whether MetaSchedule tunes that function (AMX's is a fixed kernel)


AMX = Route("amx", 32, "tdpbf16ps", AMX_BF16_KERNEL, tuned=False)
AVX512 = Route("avx512-bf16", 16, "vdpbf16ps", DOT_KERNEL, tuned=True)


def route_for(tvm_target: dict) -> Route | None:
    """AMX where the target has AMX-BF16, else AVX512 where it has AVX512-BF16, else None."""
    if target_has_amx(tvm_target, BF16_FEATURES):
        return AMX
    if cpu_has(tvm_target, "avx512bf16"):
        from .tuning.intrinsics import register_avx512_bf16

        register_avx512_bf16()
        return AVX512
    return None


def bf16_convs(mod, route: Route):
    """`mod` with its blocked fp32 convs that fill whole input blocks on bf16 inputs; returns (module, count)."""
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, wildcard

    data, weight = wildcard(), is_const()
    conv = is_op("relax.nn.conv2d")(data, weight)

    def rewrite(call, matches):
        found = _oihw(call, matches[weight], route)
        if found is None:
            return call
        kernel, in_block = found
        if route is AMX:
            return _amx_conv(matches[data], kernel, call.attrs)
        return _dot_conv(matches[data], kernel, in_block, call.attrs)

    mod = tvm.transform.Sequential([rewrite_pass(conv, rewrite, "Bf16Convs"), relax.transform.FoldConstant()])(mod)
    return mod, len(conv2d_calls(mod, is_bf16_conv))


def is_bf16_conv(call) -> bool:
    """Whether a conv2d call is one of this module's bf16 convs (either route)."""
    attrs = call.attrs
    layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout))
    return str(call.args[0].ty.dtype) == "bfloat16" and (
        layouts == (AMX_BF16.data, AMX_BF16.kernel, BF16_OUT) or is_dot_layout(layouts))


def is_dot_layout(layouts) -> bool:
    """The AVX512-BF16 route's (data, kernel, out) layouts: NCHW{even}c, OIHW16o2i, NCHW16c."""
    data, kernel, out = (str(layout) for layout in layouts)
    block = _BLOCKED.fullmatch(data)
    return bool(block) and int(block.group(1)) % 2 == 0 and (kernel, out) == DOT_LAYOUTS[1:]


def _oihw(call, weight, route: Route):
    """(fp32 OIHW weight, input channels per block) of a conv the route runs in bf16, else None: blocked by
    `route.block` (NCHW{b}c, OIHW{b}i{b}o, groups 1) or, on AVX512-BF16, a stem whose input is one narrower
    block (e.g. RGB: NCHW3c, OIHW3i16o), whose channels are padded to a whole pair."""
    attrs = call.attrs
    layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout))
    block = _BLOCKED.fullmatch(layouts[0])
    if block is None or int(attrs.groups) != 1:
        return None
    in_block = int(block.group(1))
    if layouts[1:] != (f"OIHW{in_block}i{route.block}o", f"NCHW{route.block}c"):
        return None
    blocks = weight.value.numpy()
    if blocks.dtype != np.float32:
        return None
    ob, cb, kh, kw, ib, lanes = blocks.shape
    if in_block != route.block and (route is AMX or cb != 1):
        return None
    kernel = np.ascontiguousarray(blocks.transpose(0, 5, 1, 4, 2, 3).reshape(ob * lanes, cb * ib, kh, kw))
    return kernel, in_block


def _bf16_padded(data, attrs, extra_channels: int = 0):
    """`data` rounded to bf16, padded as the conv pads (and by `extra_channels` zero channels in its block)."""
    from tvm import relax

    x = relax.op.astype(data, "bfloat16")
    top, left, bottom, right = (int(p) for p in attrs.padding)
    if top or left or bottom or right or extra_channels:
        x = relax.op.nn.pad(x, [0, 0, 0, 0, top, bottom, left, right, 0, extra_channels])
    return x


def _amx_conv(data, kernel: np.ndarray, attrs):
    import ml_dtypes
    from tvm import relax

    tiles = tile_kernel(kernel.astype(ml_dtypes.bfloat16), AMX_BF16)
    return relax.op.nn.conv2d(_bf16_padded(data, attrs), relax.const(tiles), strides=attrs.strides,
                              padding=[0, 0, 0, 0], dilation=attrs.dilation, data_layout=AMX_BF16.data,
                              kernel_layout=AMX_BF16.kernel, out_layout=BF16_OUT, out_dtype="float32")


def pair_kernel(weight: np.ndarray) -> np.ndarray:
    """OIHW (O and C multiples of 16) -> OIHW16o2i: (O/16, C/2, KH, KW, 16, 2), a vdpbf16ps operand per (O/16, C/2, kh, kw)."""
    o, c, kh, kw = weight.shape
    blocks = weight.reshape(o // 16, 16, c // 2, 2, kh, kw)
    return np.ascontiguousarray(blocks.transpose(0, 2, 4, 5, 1, 3))


def _dot_conv(data, kernel: np.ndarray, in_block: int, attrs):
    import ml_dtypes
    from tvm import relax

    odd = in_block % 2  # a stem's odd channel count (RGB) gets a zero channel, with zero weights
    if odd:
        kernel = np.concatenate([kernel, np.zeros_like(kernel[:, :1])], axis=1)
    _, kernel_layout, out_layout = DOT_LAYOUTS
    return relax.op.nn.conv2d(_bf16_padded(data, attrs, odd), relax.const(pair_kernel(kernel.astype(ml_dtypes.bfloat16))),
                              strides=attrs.strides, padding=[0, 0, 0, 0], dilation=attrs.dilation,
                              data_layout=f"NCHW{in_block + odd}c", kernel_layout=kernel_layout,
                              out_layout=out_layout, out_dtype="float32")


def legalize_conv2d(bb, call):
    """call_te of `conv2d_te` for a conv2d in the AVX512-BF16 route's layouts (targets/legalize.py dispatches)."""
    attrs = call.attrs
    return bb.call_te(conv2d_te, call.args[0], call.args[1], [int(s) for s in attrs.strides],
                      [int(d) for d in attrs.dilation], primfunc_name_hint=DOT_KERNEL)


def conv2d_te(data, kernel, strides, dilation):
    """out (N, O/16, OH, OW, 16) f32 = data (NCHW16c bf16, padded) * kernel (OIHW16o2i bf16), products in fp32.

    The reduction's innermost pair (ri) and the 16 output lanes are what the intrinsic tensorizes."""
    from tvm import te

    from .legalize import out_size

    n, c_blocks, height, width, block = data.shape
    o_blocks, _, kh, kw, lanes, pair = kernel.shape
    sh, sw = strides
    dh, dw = dilation
    out_h, out_w = out_size(height, kh, sh, dh), out_size(width, kw, sw, dw)
    pairs = block // pair
    rc = te.reduce_axis((0, c_blocks), "rc")
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    rp = te.reduce_axis((0, pairs), "rp")
    ri = te.reduce_axis((0, pair), "ri")
    return te.compute(
        (n, o_blocks, out_h, out_w, lanes),
        lambda b, ob, y, x, oi: te.sum(
            data[b, rc, y * sh + ry * dh, x * sw + rx * dw, rp * pair + ri].astype("float32")
            * kernel[ob, rc * pairs + rp, ry, rx, oi, ri].astype("float32"),
            axis=[rc, ry, rx, rp, ri]),
        name=DOT_KERNEL)
