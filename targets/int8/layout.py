"""Blocked int8 conv2d for the CPU's dot-product instruction (x86 VNNI `vpdpbusd`, AArch64 `sdot`).

`vpdpbusd` multiplies 4 consecutive u8 activations with 4 consecutive s8 weights and adds
the 4 products into one of 16 int32 lanes. In NCHW the 4 input channels it reduces over
lie H*W apart, so LLVM can only vectorise over pixels and widen each byte. Here the int8
conv2d runs in the blocked layouts the instruction wants:

    data   NCHW4c     (N, C/4, H, W, 4)          u8: 4 input channels contiguous
    kernel OIHW16o4i  (O/16, C/4, KH, KW, 16, 4)  s8: 16 output x 4 input channels, 64 bytes
    out    NCHW16c    (N, O/16, OH, OW, 16)       s32: the instruction's 16 lanes

AArch64's sdot is the same with 4 lanes (OIHW4o4i, NCHW4c out) and s8 x s8 products, so
the u8 activations are shifted to s8 (x - 128, zero point likewise) on the way in.

x86 without VNNI (AVX2 only, e.g. Zen 3) has no exact 8-bit dot product: `vpmaddubsw`
sums two u8 x s8 products into a saturating 16-bit lane. `vpmaddwd` multiplies pairs of
16-bit values into 8 int32 lanes exactly, at twice the multiply-adds of an fp32 FMA, so
there both operands are widened to s16 (weights once at build time, activations by the
layout change that blocks them): NCHW2c s16 x OIHW8o2i s16 -> NCHW8c s32.

Channels that do not fill a block are padded with zero weights (so their activations do
not count) and sliced off after. Relax's conv2d accepts these layouts but its TOPI
legalization does not, so `legalize_conv2d` writes the compute in TE; MetaSchedule then
tiles it and tensorizes the (lanes x reduce) inner loops: `intrinsics.VNNI_INTRIN` or
`intrinsics.AVX2_INTRIN` on x86, TVM's `dot_4x4_i8i8s32_sdot` on AArch64.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DotLayout:
    lanes: int      # output channels per instruction (int32 lanes)
    reduce: int     # input channels each lane sums
    instruction: str
    llvm_intrinsic: str  # what a tensorized kernel calls (intrinsics.py)
    tensor_intrin: str   # the TensorIntrin tuning tensorizes the inner loops with
    data_dtype: str = "uint8"  # sdot multiplies s8 x s8: u8 activations are shifted by -128 first
    kernel_dtype: str = "int8"
    tiles: bool = False  # AMX (amx.py): a fixed TIR kernel on tile registers, kernel in tile order
    acc_dtype: str = "int32"  # what the instruction sums into (AMX-BF16: float32)

    @property
    def operands(self) -> str:
        """The multiplication as the report names it, e.g. "u8 x s8" or "u8 x s8 as s16"."""
        if self.data_dtype == "bfloat16":
            return "bf16 x bf16"
        data = {"uint8": "u8", "int8": "s8", "int16": "u8"}[self.data_dtype]
        return f"{data} x s8" + (" as s16" if self.kernel_dtype == "int16" else "")

    @property
    def data(self) -> str:
        return f"NCHW{self.reduce}c"

    @property
    def kernel(self) -> str:
        return f"OIHW{self.lanes}o{self.reduce}i"

    @property
    def out(self) -> str:
        return f"NCHW{self.lanes}c"


BLOCKED_KERNEL = "conv2d_NCHWc_int8"  # the TIR function's name (kept in fused task names)

VNNI = DotLayout(lanes=16, reduce=4, instruction="vpdpbusd", llvm_intrinsic="llvm.x86.avx512.vpdpbusd.512",
                 tensor_intrin="tensorfold_dot_16x4_vnni")
# x86 without VNNI: 8 lanes of 2 s16 x s16 products (both widened from 8 bits: exact)
AVX2 = DotLayout(lanes=8, reduce=2, instruction="vpmaddwd", llvm_intrinsic="llvm.x86.avx2.pmadd.wd",
                 tensor_intrin="tensorfold_dot_8x2_avx2", data_dtype="int16", kernel_dtype="int16")
# AArch64 dot product (FEAT_DotProd): 4 lanes of 4 s8 x s8 products, TVM's `dot_4x4_i8i8s32_sdot`
SDOT = DotLayout(lanes=4, reduce=4, instruction="sdot", llvm_intrinsic="llvm.aarch64.neon.sdot",
                 tensor_intrin="dot_4x4_i8i8s32_sdot", data_dtype="int8")
LAYOUTS = (VNNI, AVX2, SDOT)


def dot_layout_for(tvm_target: dict) -> DotLayout | None:
    """The blocked layout whose instruction `tvm_target` has, or None (conv2d stays NCHW)."""
    from ..registry import cpu_has

    if cpu_has(tvm_target, "avx512vnni"):
        from ..tuning.intrinsics import register_vnni

        register_vnni()
        return VNNI
    if cpu_has(tvm_target, "avx2"):
        from ..tuning.intrinsics import register_avx2

        register_avx2()
        return AVX2
    if cpu_has(tvm_target, "dotprod", arch="aarch64"):
        return SDOT
    return None


def tensorized_kernels(mod, layout: DotLayout) -> list[str]:
    """The TIR functions that call the layout's dot-product intrinsic (i.e. tuning tensorized them)."""
    from tvm import tirx

    return sorted(gvar.name_hint for gvar, func in mod.functions.items()
                  if isinstance(func, tirx.PrimFunc) and layout.llvm_intrinsic in func.script())


def blocked_kernel(weight: np.ndarray, layout: DotLayout) -> np.ndarray:
    """OIHW s8 -> OIHW{lanes}o{reduce}i, zero-padded to whole blocks (AMX: its tile order)."""
    if layout.tiles:
        from .amx import tile_kernel

        return tile_kernel(weight)
    o, c, kh, kw = weight.shape
    o_pad, c_pad = _round_up(o, layout.lanes), _round_up(c, layout.reduce)
    padded = np.zeros((o_pad, c_pad, kh, kw), weight.dtype)
    padded[:o, :c] = weight
    blocks = padded.reshape(o_pad // layout.lanes, layout.lanes, c_pad // layout.reduce, layout.reduce, kh, kw)
    return np.ascontiguousarray(blocks.transpose(0, 2, 4, 5, 1, 3))


def blocked_conv2d(data, weight: np.ndarray, zero: int, attrs, layout: DotLayout):
    """int32 NCHW conv2d of u8 `data` (NCHW, zero point `zero`) with s8 `weight` (OIHW), blocked inside.

    Returns (int32 result in NCHW{lanes}c with padded output channels, padded channel count,
    the zero point of the data as multiplied). The caller applies per-channel terms in that
    layout and then calls `unblock`.
    """
    from tvm import relax

    channels = int(weight.shape[1])
    r = layout.reduce
    # Blocked first (layout_transform needs its input's type, which only the matched var has).
    # The padded input channels meet zero weights; any value works, the zero point keeps it tidy.
    data = relax.op.layout_transform(data, lambda n, c, h, w: (n, c // r, h, w, c % r),
                                     pad_value=zero if channels % r else None)
    data, zero = _as_multiplied(data, zero, layout)
    top, left, bottom, right = (int(v) for v in attrs.padding)
    if top or left or bottom or right:  # the quantized zero, so the borders stay exact
        data = relax.op.nn.pad(data, [0, 0, 0, 0, top, bottom, left, right, 0, 0], pad_value=float(zero))
    kernel = blocked_kernel(weight.astype(layout.kernel_dtype), layout)
    acc = relax.op.nn.conv2d(data, relax.const(kernel), strides=attrs.strides, padding=[0, 0, 0, 0],
                             dilation=attrs.dilation, data_layout=layout.data, kernel_layout=layout.kernel,
                             out_layout=layout.out, out_dtype="int32")
    return acc, kernel.shape[0] * layout.lanes, zero


def blocked_matmul(data, rows: int, matrix: np.ndarray, zero: int, layout: DotLayout):
    """The int32 product of u8 `data` (rows, K; zero point `zero`) with s8 `matrix` (K, N), as the
    blocked conv2d of a batch of `rows` 1x1 images: (rows, K) is already (rows, K/r, 1, 1, r) in memory and
    the (rows, N/lanes, 1, 1, lanes) result is (rows, N) (padded to whole blocks), so no data moves.
    Returns (the int32 result in (rows, N/lanes, 1, 1, lanes), the padded column count, the zero point of the
    data as multiplied); None when K does not fill whole blocks of `layout.reduce` (the caller keeps the plain
    matmul). Per-column terms go on in that shape (`per_channel`), so they fuse into the kernel's epilogue."""
    from tvm import relax

    depth, columns = matrix.shape
    r = layout.reduce
    if depth % r:
        return None
    data, zero = _as_multiplied(relax.op.reshape(data, (rows, depth // r, 1, 1, r)), zero, layout)
    kernel = blocked_kernel(matrix.T.astype(layout.kernel_dtype)[:, :, None, None], layout)
    acc = relax.op.nn.conv2d(data, relax.const(kernel), data_layout=layout.data, kernel_layout=layout.kernel,
                             out_layout=layout.out, out_dtype="int32")
    return acc, kernel.shape[0] * layout.lanes, zero


def _as_multiplied(data, zero: int, layout: DotLayout):
    """Blocked u8 data (and its zero point) in the dtype the instruction multiplies: s8 for sdot (x - 128),
    s16 for vpmaddwd (widened; fused into the layout change), u8 for vpdpbusd."""
    from tvm import relax

    if layout.data_dtype == "int8":
        data = relax.op.astype(relax.op.subtract(relax.op.astype(data, "int16"), relax.const(128, "int16")), "int8")
        return data, zero - 128
    if layout.data_dtype == "int16":
        return relax.op.astype(data, "int16"), zero
    return data, zero


def per_channel(values: np.ndarray, padded: int, layout: DotLayout) -> np.ndarray:
    """A per-output-channel vector as a (1, O/lanes, 1, 1, lanes) array, zero-padded."""
    out = np.zeros(padded, values.dtype)
    out[:values.size] = values
    return out.reshape(1, padded // layout.lanes, 1, 1, layout.lanes)


def unblock(x, out_shape, padded: int):
    """NCHW{lanes}c -> NCHW of `out_shape` (the conv's), dropping the padded output channels."""
    from tvm import relax

    # permute + reshape rather than layout_transform: that op's Python wrapper needs the
    # input's type, which a freshly built expression does not have yet
    n, channels, height, width = (int(d) for d in out_shape)
    x = relax.op.reshape(relax.op.permute_dims(x, [0, 1, 4, 2, 3]), (n, padded, height, width))
    if padded != channels:
        x = relax.op.strided_slice(x, axes=[1], begin=[0], end=[channels])
    return x


def legalize_conv2d(bb, call):
    """call_te of the blocked int8 conv2d for a conv2d in one of `LAYOUTS` (targets/legalize.py dispatches)."""
    attrs = call.attrs
    strides = [int(s) for s in attrs.strides]
    dilation = [int(d) for d in attrs.dilation]
    return bb.call_te(_conv2d_blocked_te, call.args[0], call.args[1], strides, dilation,
                      primfunc_name_hint=BLOCKED_KERNEL)


def _conv2d_blocked_te(data, kernel, strides, dilation):
    from tvm import te

    from ..legalize import out_size

    n, c_blocks, height, width, reduce = data.shape
    o_blocks, _, kh, kw, lanes, _ = kernel.shape
    sh, sw = strides
    dh, dw = dilation
    out_h, out_w = out_size(height, kh, sh, dh), out_size(width, kw, sw, dw)
    rc = te.reduce_axis((0, c_blocks), "rc")
    rh = te.reduce_axis((0, kh), "rh")
    rw = te.reduce_axis((0, kw), "rw")
    ri = te.reduce_axis((0, reduce), "ri")
    return te.compute(
        (n, o_blocks, out_h, out_w, lanes),
        lambda b, ob, y, x, oi: te.sum(
            data[b, rc, y * sh + rh * dh, x * sw + rw * dw, ri].astype("int32")
            * kernel[ob, rc, rh, rw, oi, ri].astype("int32"),
            axis=[rc, rh, rw, ri]),
        name=BLOCKED_KERNEL)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
