"""QDQ float math -> integer conv2d / matmul in Relax, before building.

TVM's ONNX frontend imports a QDQ model as float math: `dequantize(x_q)` and
`dequantize(w_q)` feed a float conv2d or matmul, so the int8 weights would buy nothing.
TVM 0.27 has no pass that turns this back into integer ops (Relay's QNN dialect and its
canonicalisation are gone with Relay), so this module adds one with Relax's own pattern
language (`relax.dpl.rewrite_call`):

    conv2d(dequantize(x_q, s_x, z_x), dequantize(w_q, s_w, 0))
      -> (conv2d(pad(x_q, value=z_x), w_q, out_dtype=int32) - z_x * sum(w_q)) * (s_x * s_w)

On a CPU with a dot-product instruction (x86 VNNI, AVX2's vpmaddwd on s16, AArch64 sdot) an
ungrouped conv2d runs in that instruction's blocked layout instead (layout.py), and a matmul
whose depth fills whole blocks runs as the blocked 1x1 conv2d of a batch of rows (no data
moves: (rows, K) is (rows, K/r, 1, 1, r) already); with fixed-point requantization the
activations between blocked convs stay blocked (blocked.py).

Padding with z_x (the quantized zero) keeps the borders exact, and the z_x * sum(w_q)
term removes the activation's zero point after an u8 x s8 -> s32 accumulation (the
pair VNNI multiplies). Matmul (Gemm, MatMul) likewise. A conv whose output is not
quantized next, and every matmul, keep the float requantization: multiply by s_x * s_w,
then the graph's own `quantize`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .amx import uses_amx
from .layout import blocked_conv2d, blocked_matmul, per_channel, unblock
from .requant import quantize_multiplier, requantize_relax

INTEGER_INPUTS = ("uint8", "int8")
PRODUCT_INPUTS = INTEGER_INPUTS + ("int16",)  # 8-bit values widened for vpmaddwd (layout.AVX2)


@dataclass
class Int8Lowering:
    """What ran in int8 after the rewrite, and what stayed float (with why)."""

    int8_ops: list[str] = field(default_factory=list)
    float_ops: list[str] = field(default_factory=list)
    kernels: list[str] = field(default_factory=list)  # compiled functions with int8 x int8 -> int32 reductions
    dot_product: str | None = None  # the instruction blocked convolutions are laid out for
    tensorized: list[str] = field(default_factory=list)  # kernels whose schedule calls that instruction
    instructions: dict | None = None  # int8 multiply instructions in the library (instructions.census)
    layout_changes: dict | None = None  # into / out of the blocked layout, re-blockings (blocked.py)
    network: str | None = None  # build's int8_network as chosen: "per-conv", "blocked" or "nchw"

    def to_json(self) -> dict:
        return {"int8_ops": self.int8_ops, "float_ops": self.float_ops, "int8_kernels": self.kernels,
                "dot_product": self.dot_product, "tensorized_kernels": self.tensorized,
                "machine_instructions": self.instructions, "layout_changes": self.layout_changes,
                "network": self.network}


def has_qdq(mod) -> bool:
    return "R.dequantize(" in mod.script(show_meta=False)


def lower_qdq(mod, layout=None, fixed_point: bool = True, tiles=None):
    """(module with integer conv2d/matmul, Int8Lowering).

    layout: a layout.DotLayout to run ungrouped conv2d in the blocked layout of the
    target's dot-product instruction (None: NCHW, left to LLVM's vectoriser).
    tiles: amx.AMX where the target has AMX: ungrouped convs with >= 64 input channels run on
    its tiles (amx.uses_amx), the rest in `layout`.
    fixed_point: requantize a conv's output in integers where the graph quantizes it
    next (False: every conv keeps the float requantization).
    """
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

    lowering = Int8Lowering(dot_product=layout.instruction if layout is not None else None)
    if tiles is not None and layout is not None:
        lowering.dot_product = f"{tiles.instruction} + {layout.instruction}"

    def conv_layout(weight, attrs):
        """The blocked layout this conv runs in, or None (NCHW)."""
        if layout is None or int(attrs.groups) != 1:
            return None
        return tiles if tiles is not None and uses_amx(int(weight.shape[1]), int(attrs.groups)) else layout
    x_q, s_x, z_x = wildcard(), is_const(), is_const()
    w_q, s_w, z_w = is_const(), is_const(), is_const()
    x_dq = is_op("relax.dequantize")(x_q, s_x, z_x)
    w_dq = is_op("relax.dequantize")(w_q, s_w, z_w)
    conv = is_op("relax.nn.conv2d")(x_dq, w_dq)
    w_t = is_op("relax.permute_dims")(w_dq)
    matmul = is_op("relax.matmul")(x_dq, w_t | w_dq)
    names = {"x_q": x_q, "s_x": s_x, "z_x": z_x, "w_q": w_q, "s_w": s_w, "z_w": z_w, "w_dq": w_dq}
    # quantize(conv + bias) / quantize(conv): the conv with its requantization
    b_q, s_b, z_b = is_const(), is_const(), is_const()
    b_dq = is_op("relax.dequantize")(b_q, s_b, z_b)
    biased = is_op("relax.add")(conv, is_op("relax.reshape")(b_dq, wildcard()) | b_dq)
    s_y, z_y = is_const(), is_const()
    requantized = is_op("relax.quantize")(biased | conv, s_y, z_y)

    def parts(matches) -> dict | None:
        got = {k: matches[p] for k, p in names.items()}
        got["w_t"] = matches.get(w_t)
        x_dtype = str(got["x_q"].ty.dtype) if hasattr(got["x_q"], "ty") else str(got["x_q"].struct_info.dtype)
        arrays = {k: got[k].value.numpy() for k in ("s_x", "z_x", "w_q", "s_w", "z_w")}
        if x_dtype not in INTEGER_INPUTS or arrays["w_q"].dtype != np.int8 or np.any(arrays["z_w"] != 0) \
                or arrays["s_x"].size != 1 or arrays["z_x"].size != 1:
            return None
        arrays["axis"] = int(got["w_dq"].attrs.axis)
        return {**got, **arrays}

    def rewrite_conv(call, matches):
        p = parts(matches)
        attrs = call.attrs
        if p is None or attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW" \
                or (p["s_w"].size > 1 and p["axis"] != 0):
            lowering.float_ops.append(f"conv2d {_shape(call)}: not a u8/s8 symmetric-weight QDQ pattern")
            return call
        weight, zero = p["w_q"], int(p["z_x"].reshape(()))
        channels = weight.shape[0]
        weight_sums = weight.astype(np.int64).reshape(channels, -1).sum(axis=1)
        scale = (p["s_x"].astype(np.float64).reshape(()) * np.broadcast_to(p["s_w"].reshape(-1), (channels,)))
        blocked = conv_layout(weight, attrs)
        if blocked is not None:
            acc, padded, data_zero = blocked_conv2d(p["x_q"], weight, zero, attrs, blocked)
            correction = data_zero * weight_sums
            lowering.int8_ops.append(f"conv2d {tuple(weight.shape)} {blocked.operands} -> s32 in {blocked.data} "
                                     f"({blocked.instruction})")
            dequantized = _dequantized(acc, per_channel(correction, padded, blocked),
                                       per_channel(scale, padded, blocked))
            return unblock(dequantized, _out_shape(call), padded)
        acc = _nchw_conv2d(p["x_q"], weight, zero, attrs)
        correction = zero * weight_sums
        lowering.int8_ops.append(f"conv2d {tuple(weight.shape)} u8 x s8 -> s32")
        return _dequantized(acc, correction.reshape(1, channels, 1, 1), scale.reshape(1, channels, 1, 1))

    def rewrite_requantized(call, matches):
        conv_call = matches[conv]
        p = parts(matches)
        attrs = conv_call.attrs
        out_dtype = str(call.attrs.out_dtype)
        s_out, z_out = matches[s_y].value.numpy(), matches[z_y].value.numpy()
        if p is None or attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW" \
                or (p["s_w"].size > 1 and p["axis"] != 0) or s_out.size != 1 or z_out.size != 1 \
                or out_dtype not in INTEGER_INPUTS:
            return call  # the plain conv rewrite below decides (float requantization)
        weight, zero = p["w_q"], int(p["z_x"].reshape(()))
        channels = weight.shape[0]
        weight_sums = weight.astype(np.int64).reshape(channels, -1).sum(axis=1)
        scale = p["s_x"].astype(np.float64).reshape(()) * np.broadcast_to(
            p["s_w"].astype(np.float64).reshape(-1), (channels,))
        bias = np.zeros(channels)
        if matches.get(b_dq) is not None:
            b = matches[b_q].value.numpy().astype(np.float64) - matches[z_b].value.numpy().astype(np.float64)
            b = (b * matches[s_b].value.numpy().astype(np.float64)).reshape(-1)
            if b.size not in (1, channels):
                return call
            bias = np.broadcast_to(b, (channels,))
        # the bias in accumulator units: exactly its int32 values when its scale is s_x * s_w (ONNX's convention)
        bias_acc = np.round(bias / np.where(scale == 0, 1, scale)).astype(np.int64)
        m, shift = quantize_multiplier(scale / float(s_out.reshape(())))
        z = int(z_out.reshape(()))
        blocked = conv_layout(weight, attrs)
        if blocked is not None:
            acc, padded, data_zero = blocked_conv2d(p["x_q"], weight, zero, attrs, blocked)
            offset = bias_acc - data_zero * weight_sums
            lowering.int8_ops.append(f"conv2d {tuple(weight.shape)} {blocked.operands} -> s32 in {blocked.data} "
                                     f"({blocked.instruction}), fixed-point requantization")
            acc = relax.op.add(acc, relax.const(per_channel(offset.astype(np.int32), padded, blocked)))
            q = requantize_relax(acc, per_channel(m, padded, blocked), per_channel(shift, padded, blocked),
                                 z, out_dtype)
            return unblock(q, _out_shape(conv_call), padded)
        acc = _nchw_conv2d(p["x_q"], weight, zero, attrs)
        offset = (bias_acc - zero * weight_sums).astype(np.int32).reshape(1, channels, 1, 1)
        lowering.int8_ops.append(f"conv2d {tuple(weight.shape)} u8 x s8 -> s32, fixed-point requantization")
        acc = relax.op.add(acc, relax.const(offset))
        return requantize_relax(acc, m.reshape(1, channels, 1, 1), shift.reshape(1, channels, 1, 1), z, out_dtype)

    def rewrite_matmul(call, matches):
        p = parts(matches)
        if p is None:
            lowering.float_ops.append(f"matmul {_shape(call)}: not a u8/s8 symmetric-weight QDQ pattern")
            return call
        weight, axis = p["w_q"], p["axis"]
        if weight.ndim != 2 or (p["w_t"] is not None and [int(a) for a in p["w_t"].attrs.axes] != [1, 0]):
            lowering.float_ops.append(f"matmul {_shape(call)}: weight is not a 2-D matrix")
            return call
        out_axis = 0 if p["w_t"] is not None else 1  # the weight axis that indexes the output columns
        if p["s_w"].size > 1 and axis != out_axis:
            lowering.float_ops.append(f"matmul {_shape(call)}: weight scales are not per output column")
            return call
        matrix = weight.T.copy() if p["w_t"] is not None else weight   # (in, out)
        zero = int(p["z_x"].reshape(()))
        columns = matrix.shape[1]
        scale = p["s_x"].astype(np.float64).reshape(()) * np.broadcast_to(p["s_w"].reshape(-1), (columns,))
        sums = matrix.astype(np.int64).sum(axis=0)
        in_shape = _static_shape(p["x_q"])
        blocked = None
        if layout is not None and in_shape is not None:
            rows = int(np.prod(in_shape[:-1]))
            blocked = blocked_matmul(p["x_q"], rows, matrix, zero, layout)
        if blocked is None:
            acc = relax.op.matmul(p["x_q"], relax.const(matrix), out_dtype="int32")
            lowering.int8_ops.append(f"matmul {tuple(matrix.shape)} u8 x s8 -> s32")
            return _dequantized(acc, zero * sums, scale)
        acc, padded, data_zero = blocked
        out = _dequantized(acc, per_channel(data_zero * sums, padded, layout), per_channel(scale, padded, layout))
        out = relax.op.reshape(out, (rows, padded))
        if padded != columns:
            out = relax.op.strided_slice(out, axes=[1], begin=[0], end=[columns])
        lowering.int8_ops.append(f"matmul {tuple(matrix.shape)} {layout.operands} -> s32 as a blocked 1x1 conv2d "
                                 f"({layout.instruction})")
        return relax.op.reshape(out, (*in_shape[:-1], columns))

    def _dequantized(acc, correction, scale):
        if np.any(correction):
            acc = relax.op.subtract(acc, relax.const(correction.astype(np.int32)))
        return relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(scale.astype(np.float32)))

    updated = {}
    for gvar, func in mod.functions.items():
        if isinstance(func, relax.Function):
            if fixed_point:
                func = rewrite_call(requantized, rewrite_requantized, func)
            func = rewrite_call(conv, rewrite_conv, func)
            func = rewrite_call(matmul, rewrite_matmul, func)
        updated[gvar] = func
    mod = mod.clone()  # the caller's module stays as it was
    for gvar, func in updated.items():
        mod[gvar] = func
    mod = relax.transform.DeadCodeElimination()(mod)
    if layout is not None and fixed_point:
        from .blocked import keep_blocked, layout_changes

        mod, _ = keep_blocked(mod)
        lowering.layout_changes = layout_changes(mod)
    return mod, lowering


def _nchw_conv2d(data, weight: np.ndarray, zero: int, attrs):
    """int32 NCHW conv2d of u8 `data` (zero point `zero`, padded with it) and s8 `weight`."""
    from tvm import relax

    top, left, bottom, right = (int(v) for v in attrs.padding)
    if top or left or bottom or right:
        data = relax.op.nn.pad(data, [0, 0, 0, 0, top, bottom, left, right], pad_value=float(zero))
    return relax.op.nn.conv2d(data, relax.const(weight), strides=attrs.strides, padding=[0, 0, 0, 0],
                              dilation=attrs.dilation, groups=int(attrs.groups), out_dtype="int32")


def _static_shape(expr) -> list[int] | None:
    """The expression's shape as ints, or None where a dimension is symbolic or unknown."""
    info = getattr(expr, "ty", None) or getattr(expr, "struct_info", None)
    try:
        return [int(d) for d in info.shape.values]
    except (AttributeError, TypeError):
        return None


def _out_shape(call) -> list[int]:
    info = getattr(call, "ty", None) or call.struct_info
    return [int(d) for d in info.shape.values]


def _shape(call) -> str:
    info = getattr(call, "ty", None) or getattr(call, "struct_info", None)
    return str(getattr(info, "shape", "?"))


def int8_kernels(mod) -> list[str]:
    """The TIR functions whose reduction multiplies 8-bit integer buffers (or their 16-bit widening,
    layout.AVX2) into a 32-bit sum.

    Read from the printed TIR (0.27 exposes no Python statement visitor): a buffer's dtype
    from its declaration, and the reduction `acc = acc + Cast(int32, a) * Cast(int32, b)`.
    """
    from tvm import tirx

    kernels = []
    for gvar, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        text = func.script()
        dtypes = {name: dtype for name, dtype in _DECLARED.findall(text)}
        for acc, a, b in _INT_MAC.findall(text):
            if dtypes.get(acc) == "int32" and dtypes.get(a) in PRODUCT_INPUTS and dtypes.get(b) in PRODUCT_INPUTS:
                kernels.append(f"{gvar.name_hint}: {dtypes[a]} x {dtypes[b]} -> int32")
                break
    return kernels


_DECLARED = re.compile(r'(\w+)(?:: T\.Buffer| = T\.sblock_alloc_buffer)\(\((?:[^()]|\([^()]*\))*\)(?:, "(\w+)")?')
_INT_MAC = re.compile(r'(\w+)\[[^\]]*\] = \1\[[^\]]*\] \+ T\.Cast\("int32", (\w+)\[[^\]]*\]\) '
                      r'\* T\.Cast\("int32", (\w+)\[[^\]]*\]\)')
