"""int8 conv2d on Intel AMX tiles (`tdpbusd`), a fixed kernel written in TIR.

AMX (Sapphire Rapids and later) has eight tile registers of up to 16 rows x 64 bytes, and
`tdpbusd` multiplies a 16 x 64 u8 tile A by a 64 x 16 s8 tile B (stored as 16 rows of
16 x 4 bytes, the VNNI pairing) into a 16 x 16 int32 tile C: 16,384 multiply-adds per
instruction, where AVX-512 VNNI's `vpdpbusd` does 64. A conv maps onto it with

    data   NCHW64c   (N, C/64, H, W, 64)          u8: a pixel's 64 input channels are one A row
    kernel           (O/16, C/64, KH, KW, 16, 64)  s8: one B tile per (16 outputs, 64 inputs, kh, kw),
                                                    rows [i/4] x [o][i%4]
    out    NCHW16c   (N, O/16, OH, OW, 16)         s32: a pixel's 16 outputs are one C row

so a C tile is `rows` consecutive output pixels of one output row by 16 output channels, and
its A tile is the matching input pixels for one (64 channels, kh, kw): every tile loads
straight from the blocked tensors with a row stride (64 * stride bytes), no im2col. Each
work unit keeps P x Q C tiles (P pixel blocks, Q output-channel blocks; P, Q <= 2) in
tiles 0-3 and streams A through tiles 4-5 and B through 6-7 over the reduction.

AMX-BF16's `tdpbf16ps` is the same with bfloat16 pairs summed into fp32 (16 x 32 bf16 A tile,
B rows [i/2] x [o][i%2], 16 x 16 fp32 C tile): the same kernel with `AMX_BF16` runs the bf16
convs of an fp32 network (targets/bf16.py), data NCHW32c bf16 -> NCHW16c fp32.

Why a fixed kernel and not MetaSchedule: TVM 0.27 has no AMX tensor intrinsic (its old
TOPI schedules went with Relay), and a tile instruction needs the tile configuration
(`ldtilecfg`) loaded in the thread that runs it, which a tensorized inner loop cannot hold.
Linux also hands AMX state to a process only after `arch_prctl(ARCH_REQ_XCOMP_PERM,
XTILEDATA)`; the kernel asks for it itself (a syscall per call, ~1 us), so the library
runs in any process, tensorfold's or plain TVM's.
"""
from __future__ import annotations

import functools

import numpy as np

from .layout import DotLayout, _round_up, tensorized_kernels

AMX = DotLayout(lanes=16, reduce=64, instruction="tdpbusd", llvm_intrinsic="llvm.x86.tdpbusd",
                tensor_intrin="", tiles=True)
AMX_BF16 = DotLayout(lanes=16, reduce=32, instruction="tdpbf16ps", llvm_intrinsic="llvm.x86.tdpbf16ps",
                     tensor_intrin="", tiles=True, data_dtype="bfloat16", kernel_dtype="bfloat16",
                     acc_dtype="float32")
BF16_OUT = "NCHW32c"  # the bf16 convs' output layout: whole 32-channel blocks, the next bf16 conv's input
AMX_KERNEL = "conv2d_NCHW64c_amx"  # the TIR functions' names
AMX_BF16_KERNEL = "conv2d_NCHW32c_amx_bf16"
MIN_CHANNELS = 64  # narrower convs pad their input channels to 64: VNNI's 4-channel blocks waste less
FEATURES = ("amx-tile", "amx-int8")
BF16_FEATURES = ("amx-tile", "amx-bf16")
_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1023, 18


def target_has_amx(tvm_target: dict, features=FEATURES) -> bool:
    """Whether `tvm_target` has AMX's int8 tiles (`features`: BF16_FEATURES for its bf16 ones)."""
    from ..registry import cpu_has

    return cpu_has(tvm_target, *features)


def host_amx_mattr() -> list[str]:
    """LLVM features for the AMX this CPU has and Linux lets us use, which LLVM's host CPU name may
    lack (a VM's Xeon with AMX is read as `rocketlake`, which has none): [] where either is missing."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    if not {"amx_tile", "amx_int8"} <= set(flags) or not _request_permission():
        return []
    return [f"+{f}" for f in FEATURES] + (["+amx-bf16"] if "amx_bf16" in flags else [])


@functools.cache
def _request_permission() -> bool:
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def uses_amx(channels: int, groups: int) -> bool:
    """Whether a conv with `channels` inputs runs on AMX tiles (else the VNNI layout)."""
    return groups == 1 and channels >= MIN_CHANNELS


def tile_kernel(weight: np.ndarray, tiles: DotLayout = AMX) -> np.ndarray:
    """OIHW -> (O/16, C/r, KH, KW, 16, r) B tiles, r = tiles.reduce: rows [i/g], columns [o][i%g] with g the
    values per 4 bytes (s8: r = 64, g = 4; bf16: r = 32, g = 2), zero-padded."""
    o, c, kh, kw = weight.shape
    r, g = tiles.reduce, tiles.reduce // 16
    o_pad, c_pad = _round_up(o, 16), _round_up(c, r)
    padded = np.zeros((o_pad, c_pad, kh, kw), weight.dtype)
    padded[:o, :c] = weight
    blocks = padded.reshape(o_pad // 16, 16, c_pad // r, 16, g, kh, kw).transpose(0, 2, 5, 6, 3, 1, 4)
    return np.ascontiguousarray(blocks.reshape(o_pad // 16, c_pad // r, kh, kw, 16, r))


def rows_per_tile(width: int) -> int:
    """Output pixels per tile: the largest divisor of the output width up to 16 (a tile never
    crosses an output row, so its A rows stay one stride apart)."""
    return max(d for d in range(1, 17) if width % d == 0)


def conv2d_primfunc(data_shape, kernel_shape, strides, dilation, tiles: DotLayout = AMX, out_block: int = 16,
                    max_chunks: int = 64):
    """The TIR kernel: out (N, O/16, OH, OW, 16) s32 = data (NCHW64c u8, padded) * kernel (tile_kernel);
    with AMX_BF16, fp32 = NCHW32c bf16 * bf16 tiles. out_block: output channels per block of `out`, 16 or
    32 (NCHW32c: two C tiles side by side in each pixel's row, stored with a 128-byte row stride)."""
    from tvm.script import tirx as T

    from ..legalize import out_size

    r, data_dtype, kernel_dtype, acc_dtype = tiles.reduce, tiles.data_dtype, tiles.kernel_dtype, tiles.acc_dtype
    instruction = tiles.llvm_intrinsic

    n_, cb, height, width, _ = (int(d) for d in data_shape)
    ob, _, kh_, kw_, _, _ = (int(d) for d in kernel_shape)
    sh, sw = (int(s) for s in strides)
    dh, dw = (int(d) for d in dilation)
    out_h, out_w = out_size(height, kh_, sh, dh), out_size(width, kw_, sw, dw)
    rows = rows_per_tile(out_w)
    wb = out_w // rows                  # pixel blocks per output row
    blocks = out_h * wb                 # pixel blocks per image
    p_ = 2 if blocks % 2 == 0 else 1    # pixel blocks per unit
    q_ = 2 if ob % 2 == 0 else 1        # output-channel blocks per unit
    k_ = out_block // 16                # C tiles per block of `out`
    assert out_block in (16, 32) and ob % k_ == 0 and q_ % k_ == 0, (out_block, ob)
    per_image, per_ob = (ob // q_) * (blocks // p_), blocks // p_
    units = n_ * per_image
    chunks = min(units, max_chunks)     # one tile configuration per chunk (per thread task)
    per = -(-units // chunks)

    @T.prim_func(private=True, s_tir=True)
    def kernel(data: T.Buffer((n_, cb, height, width, r), data_dtype),
               weight: T.Buffer((ob, cb, kh_, kw_, 16, r), kernel_dtype),
               out: T.Buffer((n_, ob // k_, out_h, out_w, out_block), acc_dtype)):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        with T.sblock("root"):
            with T.sblock("amx"):  # one opaque block: SplitLayoutRewritePreproc wants one under the root
                T.reads(data[0:n_, 0:cb, 0:height, 0:width, 0:r], weight[0:ob, 0:cb, 0:kh_, 0:kw_, 0:16, 0:r])
                T.writes(out[0:n_, 0:ob // k_, 0:out_h, 0:out_w, 0:out_block])
                T.evaluate(T.call_extern("int64", "syscall", T.int64(_ARCH_PRCTL), T.int64(_ARCH_REQ_XCOMP_PERM),
                                         T.int64(_XFEATURE_XTILEDATA)))
                for chunk in T.parallel(chunks):
                    config = T.alloc_buffer((64,), "uint8", scope="local")
                    for i in range(64):
                        config[i] = T.uint8(0)
                    config[0] = T.uint8(1)  # palette 1
                    for t in range(8):      # C 0-3 and A 4-5: `rows` x 64 bytes; B 6-7: 16 x 64 bytes
                        config[16 + 2 * t] = T.uint8(64)
                        config[48 + t] = T.if_then_else(t >= 6, T.uint8(16), T.uint8(rows))
                    T.call_llvm_intrin("void", "llvm.x86.ldtilecfg", T.address_of(config[0]))
                    for step in range(per):
                        if chunk * per + step < units:
                            n = (chunk * per + step) // per_image
                            o = (chunk * per + step) % per_image // per_ob * q_
                            b = (chunk * per + step) % per_ob * p_
                            for t in T.unroll(p_ * q_):
                                T.call_llvm_intrin("void", "llvm.x86.tilezero", T.uint8(t))
                            for c, ky, kx in T.grid(cb, kh_, kw_):
                                for p in T.unroll(p_):
                                    T.call_llvm_intrin(
                                        "void", "llvm.x86.tileloadd64", T.uint8(4 + p),
                                        T.address_of(data[n, c, (b + p) // wb * sh + ky * dh,
                                                          (b + p) % wb * rows * sw + kx * dw, 0]),
                                        T.int64(64 * sw))
                                for q in T.unroll(q_):
                                    T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.uint8(6 + q),
                                                       T.address_of(weight[o + q, c, ky, kx, 0, 0]), T.int64(64))
                                for p in T.unroll(p_):
                                    for q in T.unroll(q_):
                                        T.call_llvm_intrin("void", instruction, T.uint8(p * q_ + q),
                                                           T.uint8(4 + p), T.uint8(6 + q))
                            for p in T.unroll(p_):
                                for q in T.unroll(q_):
                                    T.call_llvm_intrin("void", "llvm.x86.tilestored64", T.uint8(p * q_ + q),
                                                       T.address_of(out[n, (o + q) // k_, (b + p) // wb,
                                                                        (b + p) % wb * rows, (o + q) % k_ * 16]),
                                                       T.int64(4 * out_block))
                    T.call_llvm_intrin("void", "llvm.x86.tilerelease")

    return kernel


def legalize_conv2d(bb, call):
    """call_tir of `conv2d_primfunc` for a conv2d in AMX's layouts (targets/legalize.py dispatches here)."""
    from tvm import relax

    attrs = call.attrs
    data, weight = call.args
    bf16 = str(data.ty.dtype) == "bfloat16"
    func = conv2d_primfunc(data.ty.shape, weight.ty.shape, attrs.strides, attrs.dilation, AMX_BF16 if bf16 else AMX,
                           out_block=int(call.ty.shape[-1]))
    gvar = bb.add_func(func, AMX_BF16_KERNEL if bf16 else AMX_KERNEL)
    return relax.call_tir(gvar, [data, weight], call.ty)


def amx_kernels(mod) -> list[str]:
    """The TIR functions that call `tdpbusd`."""
    return tensorized_kernels(mod, AMX)


def amx_bf16_kernels(mod) -> list[str]:
    """The TIR functions that call `tdpbf16ps`."""
    return tensorized_kernels(mod, AMX_BF16)


def is_amx_task(task) -> bool:
    """A MetaSchedule task of a fixed AMX kernel, int8 or bf16 (nothing to tune)."""
    if AMX_KERNEL in task.task_name or AMX_BF16_KERNEL in task.task_name:
        return True
    script = task.dispatched[0].script()
    return AMX.llvm_intrinsic in script or AMX_BF16.llvm_intrinsic in script
