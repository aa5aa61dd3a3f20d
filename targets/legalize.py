"""Relax's LegalizeOps with tensorfold's conv2d computes: one per blocked layout the build writes.

Relax has TOPI computes for NCHW / NHWC conv2d only. The build's blocked convs get theirs here,
by layout (and dtype):

- int8 dot-product layouts (int8/layout.py: VNNI, AVX2, sdot): a TE compute MetaSchedule tensorizes;
- AMX's int8 and bf16 tiles (int8/amx.py): a fixed TIR kernel;
- bf16 on AVX512-BF16 (bf16.py): a TE compute tensorized with `vdpbf16ps`;
- fp32 NCHW{lanes}c (float_layout.py): a TE compute;
- anything else: TVM's own legalization.
"""
from __future__ import annotations


def legalize():
    """LegalizeOps with `conv2d` for conv2d; every other op legalizes as TVM does."""
    from tvm import relax

    return relax.transform.LegalizeOps({"relax.nn.conv2d": conv2d})


def conv2d(bb, call):
    """The compute of a conv2d call, chosen by its (data, kernel, out) layouts."""
    from . import bf16, float_layout
    from .int8 import amx, layout as int8_layout

    attrs = call.attrs
    layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout))
    if any(layouts == (lay.data, lay.kernel, lay.out) for lay in int8_layout.LAYOUTS):
        return int8_layout.legalize_conv2d(bb, call)
    if layouts in ((amx.AMX.data, amx.AMX.kernel, amx.AMX.out),
                   (amx.AMX_BF16.data, amx.AMX_BF16.kernel, amx.BF16_OUT)):
        return amx.legalize_conv2d(bb, call)
    if bf16.is_dot_layout(layouts) and str(call.args[0].ty.dtype) == "bfloat16":
        return bf16.legalize_conv2d(bb, call)
    return float_layout.legalize_conv2d(bb, call)  # a blocked fp32 conv2d, else TVM's own


def out_size(size, kernel, stride: int, dilation: int):
    """Output rows (or columns) of a conv over `size` already padded rows: what every compute here shares."""
    return (size - (kernel - 1) * dilation - 1) // stride + 1
