"""fp32 convolutions in the blocked layout the CPU's vectors want (NCHW{lanes}c), across the network.

In NCHW a conv's output channels lie H*W apart, so a vectorised inner loop runs over pixels
and every weight is a scalar broadcast; MetaSchedule tunes that shape, and on ResNet-18 it
stayed behind onnxruntime (README, fp32). In the blocked layouts

    data   NCHW{ib}c           (N, C/ib, H, W, ib)           ib = lanes, or C where C < lanes (the RGB input)
    kernel OIHW{ib}i{lanes}o   (O/lanes, C/ib, KH, KW, ib, lanes)
    out    NCHW{lanes}c        (N, O/lanes, OH, OW, lanes)

one FMA multiplies a broadcast input value by `lanes` consecutive output channels' weights
and adds into one vector of outputs, all loads contiguous: the layout of oneDNN's and
TVM's old x86 conv2d_NCHWc. Relax's ConvertLayout carries the layout through the ops between
convs (bias, relu, residual add, pooling), so the network changes layout once at the input
and once where an op needs NCHW (the classifier's mean / matmul); the weights are re-laid
once at build time (FoldConstant). Relax has no TOPI compute for these conv2d layouts, so
`legalize_conv2d` writes it in TE for MetaSchedule to tune.

Depthwise convs run blocked too (each lane its own channel). ReLU6 is imported as `clip`,
whose layout inference knows no blocked layout, so it is rewritten as maximum / minimum first.
Left in NCHW: other grouped convs and convs whose output channels do not fill whole blocks
(a layout change on each side of them).
"""
from __future__ import annotations

import re

BLOCKED_KERNEL = "conv2d_NCHWc_float"  # the TIR functions' names (kept in fused task names)
BLOCKED_DEPTHWISE = "depthwise_conv2d_NCHWc_float"
_BLOCKED = re.compile(r"NCHW(\d+)c")


def lanes_for(tvm_target: dict) -> int | None:
    """fp32 lanes of the widest vector `tvm_target` has (x86: 16 with AVX-512, 8 with AVX2), or None."""
    from .registry import cpu_has

    return 16 if cpu_has(tvm_target, "avx512f") else 8 if cpu_has(tvm_target, "avx2") else None


def block_convs(mod, lanes: int):
    """`mod` with its fp32 conv2d (groups=1 and depthwise) in NCHW{ib}c -> NCHW{lanes}c and the ops between
    them carried along (ConvertLayout); constant weights re-laid at once. Returns (module, blocked convs)."""
    import tvm
    from tvm import relax

    def desired(call):
        if call.op.name != "relax.nn.conv2d":
            return {}
        attrs = call.attrs  # a conv that cannot be blocked keeps the layouts it has
        layouts = _blocked_layouts(call, lanes) or [attrs.data_layout, attrs.kernel_layout, attrs.out_layout]
        return {"relax.nn.conv2d": layouts}

    if not _has_blockable_conv(mod, lanes):  # nothing to gain (and ConvertLayout failed on topk here)
        return mod, 0
    mod = tvm.transform.Sequential([
        relax.transform.DecomposeOpsForInference(),  # batch_norm has no blocked form; its arithmetic does
        relax.transform.CanonicalizeBindings(),
        _clip_as_min_max(),
        relax.transform.ConvertLayout({}, desired),
        relax.transform.EliminateCommonSubexpr(),    # one layout change per value, however many readers
        relax.transform.FoldConstant()])(mod)
    return mod, _count_blocked(mod)


def _has_blockable_conv(mod, lanes: int) -> bool:
    return bool(conv2d_calls(mod, lambda call: _blocked_layouts(call, lanes) is not None))


def _count_blocked(mod) -> int:
    return len(conv2d_calls(mod, lambda call: bool(_BLOCKED.fullmatch(str(call.attrs.data_layout)))
                             and str(call.args[0].ty.dtype) == "float32"))


def conv2d_calls(mod, keep) -> list:
    """The conv2d calls of `mod`'s Relax functions for which `keep(call)` holds."""
    from tvm import relax

    calls = []

    def visit(expr):
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.nn.conv2d" and keep(expr):
            calls.append(expr)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return calls


def _blocked_layouts(call, lanes: int) -> list[str] | None:
    from tvm import tirx

    attrs = call.attrs
    data, weight = call.args
    if (attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW"
            or str(data.ty.dtype) != "float32" or str(weight.ty.dtype) != "float32"):
        return None
    shape = getattr(weight.ty, "shape", None)
    values = getattr(shape, "values", None)
    if values is None or not all(isinstance(v, tirx.IntImm) for v in values):
        return None
    out_channels, group_channels = int(values[0]), int(values[1])
    if out_channels % lanes:
        return None
    if attrs.groups != 1:  # depthwise: one input channel per output channel, in the same lane
        depthwise = group_channels == 1 and int(attrs.groups) == out_channels
        return [f"NCHW{lanes}c", f"OIHW1i{lanes}o", f"NCHW{lanes}c"] if depthwise else None
    # the input block: whole vectors, or the largest divisor of the channels below that (RGB: 3)
    ib = max(d for d in range(1, lanes + 1) if group_channels % d == 0)
    return [f"NCHW{ib}c", f"OIHW{ib}i{lanes}o", f"NCHW{lanes}c"]


def _clip_as_min_max():
    """clip(x, lo, hi) -> minimum(maximum(x, lo), hi): the same values, in ops ConvertLayout carries blocked."""
    from tvm import relax
    from tvm.relax.dpl import is_op, wildcard

    value = wildcard()
    clip = is_op("relax.clip")(value, wildcard(), wildcard())

    def rewrite(call, matches):
        dtype = call.ty.dtype
        low, high = (float(bound.value) for bound in call.args[1:])
        return relax.op.minimum(relax.op.maximum(matches[value], relax.const(low, dtype)), relax.const(high, dtype))

    return rewrite_pass(clip, rewrite, "ClipAsMinMax")


def rewrite_pass(pattern, rewrite, name: str):
    """A module pass applying `rewrite(call, matches)` to every match of `pattern` in each Relax function."""
    import tvm
    from tvm import relax
    from tvm.relax.dpl import rewrite_call

    @tvm.transform.module_pass(opt_level=0, name=name)
    def apply(mod, _ctx):
        mod = mod.clone()
        for gvar, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                mod[gvar] = rewrite_call(pattern, rewrite, func)
        return mod

    return apply


def legalize_conv2d(bb, call):
    """call_te of the blocked fp32 conv2d for a conv2d in these layouts, else TVM's own legalization."""
    from tvm.relax.transform.legalize_ops.nn import _nn_conv2d

    attrs = call.attrs
    if not _BLOCKED.fullmatch(str(attrs.data_layout)) or str(call.args[0].ty.dtype) != "float32":
        return _nn_conv2d(bb, call)
    return bb.call_te(_conv2d_te, call.args[0], call.args[1], [int(s) for s in attrs.strides],
                      [int(p) for p in attrs.padding], [int(d) for d in attrs.dilation], int(attrs.groups) != 1,
                      primfunc_name_hint=BLOCKED_DEPTHWISE if int(attrs.groups) != 1 else BLOCKED_KERNEL)


def _conv2d_te(data, kernel, strides, padding, dilation, depthwise: bool):
    from tvm import te, topi

    from .legalize import out_size

    n, c_blocks, height, width, ib = data.shape
    o_blocks, _, kh, kw, _, lanes = kernel.shape
    top, left, bottom, right = padding
    if top or left or bottom or right:  # in the same PrimFunc: MetaSchedule inlines it into the conv's loads
        data = topi.nn.pad(data, [0, 0, top, left, 0], [0, 0, bottom, right, 0], name="pad")
    sh, sw = strides
    dh, dw = dilation
    out_h, out_w = out_size(height + top + bottom, kh, sh, dh), out_size(width + left + right, kw, sw, dw)
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    if depthwise:
        return te.compute(
            (n, o_blocks, out_h, out_w, lanes),
            lambda b, ob, y, x, oi: te.sum(
                data[b, ob, y * sh + ry * dh, x * sw + rx * dw, oi] * kernel[ob, 0, ry, rx, 0, oi], axis=[ry, rx]),
            name=BLOCKED_DEPTHWISE)
    rc = te.reduce_axis((0, c_blocks), "rc")
    ri = te.reduce_axis((0, ib), "ri")
    return te.compute(
        (n, o_blocks, out_h, out_w, lanes),
        lambda b, ob, y, x, oi: te.sum(
            data[b, rc, y * sh + ry * dh, x * sw + rx * dw, ri] * kernel[ob, rc, ry, rx, ri, oi],
            axis=[rc, ry, rx, ri]),
        name=BLOCKED_KERNEL)
