"""Register only the tensor intrinsics a target's tuning can use.

MetaSchedule's TuneContext runs `import tvm.s_tir.tensor_intrin`, whose `__init__` parses
every intrinsic family as TVMScript. Measured with `python -X importtime` on the 2-core
EPYC: 66 s in all, of which the CUDA family is 45 s, ROCm 6 s, Hexagon 3 s; x86 0.6 s and
ARM 3 s (with their shared dot-product helpers). A CPU build tunes with the x86 or ARM
intrinsics only, so we import those submodules and register the package without running
its `__init__`; the later `import tvm.s_tir.tensor_intrin` then finds it already loaded.
A CUDA target (or any other) imports the family it needs explicitly.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

PACKAGE = "tvm.s_tir.tensor_intrin"


def load_for(tvm_target: dict) -> None:
    kind = tvm_target.get("kind")
    triple = str(tvm_target.get("mtriple", ""))
    if kind == "llvm" and triple.startswith("x86_64"):
        families = ["x86"]
    elif kind == "llvm" and triple.startswith("aarch64"):
        families = ["arm_cpu"]
    elif kind == "cuda":
        families = ["cuda"]
    else:
        importlib.import_module(PACKAGE)  # unknown family: the whole registry, as TVM does
        return
    if PACKAGE not in sys.modules:
        spec = importlib.util.find_spec(PACKAGE)
        package = importlib.util.module_from_spec(spec)  # __path__ set, __init__ not run
        sys.modules[PACKAGE] = package
        setattr(importlib.import_module("tvm.s_tir"), "tensor_intrin", package)
    for family in families:
        importlib.import_module(f"{PACKAGE}.{family}")
    if families == ["x86"]:  # tensorfold's own (int8 layouts, bf16), which tuned records name like TVM's
        register_vnni()
        register_avx2()
        register_avx512_bf16()
        register_fma(16)
        register_fma(8)


VNNI_INTRIN = "tensorfold_dot_16x4_vnni"


def register_vnni() -> None:
    """Register `VNNI_INTRIN`: C[16] s32 += A[4] u8 . B[16, 4] s8, one `vpdpbusd`.

    TVM's own `dot_16x4_vnni` passes the bytes as <16 x i32>; LLVM 21 changed the intrinsic
    to take <64 x i8> (TVM 0.27 ships LLVM 22), so every candidate tensorized with it fails
    LLVM's verifier ("Call parameter type does not match function signature").
    """
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T
    from tvm.target import codegen

    if TensorIntrin.get(VNNI_INTRIN, allow_missing=True) is not None:
        return
    byte_vectors = codegen.llvm_version_major() >= 21
    a_type, b_type = ("uint8x64", "int8x64") if byte_vectors else ("int32x16", "int32x16")

    desc = _dot_desc(16, 4, "uint8", "int8")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((16, 4), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            a_word = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")  # the 4 bytes, broadcast to all lanes
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(a_word, 16), dtype=a_type),
                T.reinterpret(B.vload([0, 0], dtype="int8x64"), dtype=b_type),
                dtype="int32x16")

    TensorIntrin.register(VNNI_INTRIN, desc, impl)


AVX2_INTRIN = "tensorfold_dot_8x2_avx2"


def register_avx2() -> None:
    """Register `AVX2_INTRIN`: C[8] s32 += A[2] s16 . B[8, 2] s16, one `vpmaddwd` and one add.

    For x86 without VNNI (layout.AVX2): `vpmaddwd` sums each pair of 16-bit products into an
    int32 lane exactly, where `vpmaddubsw` (TVM's `dot_16x4_avx512` form) saturates at 16 bits.
    """
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    if TensorIntrin.get(AVX2_INTRIN, allow_missing=True) is not None:
        return

    desc = _dot_desc(8, 2, "int16", "int16")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((2,), "int16", offset_factor=1), B: T.Buffer((8, 2), "int16", offset_factor=1),
             C: T.Buffer((8,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:2], B[0:8, 0:2])
            T.writes(C[0:8])
            a_pair = T.reinterpret(A.vload([0], "int16x2"), dtype="int32")  # the 2 values, broadcast to all lanes
            C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                T.reinterpret(T.broadcast(a_pair, 8), dtype="int16x16"),
                B.vload([0, 0], dtype="int16x16"),
                dtype="int32x8")

    TensorIntrin.register(AVX2_INTRIN, desc, impl)


BF16_INTRIN = "tensorfold_dot_16x2_bf16"
BF16_FUNCTION = "tensorfold_dpbf16ps"  # the LLVM function the tensorized kernels call (below)

# `vdpbf16ps` takes <32 x bfloat> operands, a type TIR cannot pass to an LLVM intrinsic: its bf16
# legalization turns bf16 values into f32 or i16 vectors, and LLVM's verifier refuses both
# (docs/toolchain.md). So the call goes through this LLVM function, which takes the pairs as
# <16 x i32> and bitcasts them; the kernel imports it (`pragma_import_llvm`) and LLVM inlines it.
_BF16_LLVM = r"""
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)

define <16 x float> @tensorfold_dpbf16ps(<16 x float> %acc, <16 x i32> %a, <16 x i32> %b) #0 {
  %a.pairs = bitcast <16 x i32> %a to <32 x bfloat>
  %b.pairs = bitcast <16 x i32> %b to <32 x bfloat>
  %sum = call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %acc, <32 x bfloat> %a.pairs, <32 x bfloat> %b.pairs)
  ret <16 x float> %sum
}

attributes #0 = { "target-features"="+avx512f,+avx512bf16" }
"""


def register_avx512_bf16() -> None:
    """Register `BF16_INTRIN`: C[16] f32 += A[2] bf16 . B[16, 2] bf16, one `vdpbf16ps` (AVX512-BF16).

    The operands are read as 32-bit words (a bf16 pair each) through int32 views of the bf16
    buffers, so they reach `_BF16_LLVM` as <16 x i32> and no bf16 value is left for TIR to legalize.
    """
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    if TensorIntrin.get(BF16_INTRIN, allow_missing=True) is not None:
        return

    desc = _dot_desc(16, 2, "bfloat16", "bfloat16", "float32", pair_aligned=2)

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((2,), "bfloat16", offset_factor=2), B: T.Buffer((16, 2), "bfloat16", offset_factor=2),
             C: T.Buffer((16,), "float32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:2], B[0:16, 0:2])
            T.writes(C[0:16])
            # the pair of A, and B's 16 pairs, as 32-bit words (offset_factor=2: both start at even offsets)
            a_word = T.decl_buffer((1,), "int32", data=A.data, elem_offset=A.elem_offset // 2)
            b_words = T.decl_buffer((16,), "int32", data=B.data, elem_offset=B.elem_offset // 2)
            with T.attr(T.int32(0), "pragma_import_llvm", _BF16_LLVM):
                C[T.ramp(T.int32(0), 1, 16)] = T.call_pure_extern(
                    "float32x16", BF16_FUNCTION, C.vload([0], dtype="float32x16"),
                    T.broadcast(a_word[0], 16), b_words.vload([0], dtype="int32x16"))

    TensorIntrin.register(BF16_INTRIN, desc, impl)


FMA_REDUCE = 4  # input channels per tensorized step: 4 broadcasts, 4 FMAs into one vector


def register_fma(lanes: int) -> str:
    """Register C[lanes] f32 += A[k] * B[k, lanes] for k < FMA_REDUCE: a broadcast and an FMA per k, for the
    blocked fp32 conv (float_layout.py: data NCHW{ib}c, kernel OIHW{ib}i{lanes}o, lanes 16 on AVX-512, 8 on
    AVX2). Returns its name.

    Why tensorize what LLVM vectorizes anyway: the step fixes the vector loop and its broadcast, so the
    trials go to register blocking and loop order. On the 2-core Zen 4 a 3x3 128-channel 28x28 conv reached
    221 GFLOP/s after 48 trials with it, 153 GFLOP/s with the default space (docs/toolchain.md)."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    name, k_, vector = f"tensorfold_fma_{lanes}x{FMA_REDUCE}_f32", FMA_REDUCE, f"float32x{lanes}"
    if TensorIntrin.get(name, allow_missing=True) is not None:
        return name

    desc = _dot_desc(lanes, k_, "float32", "float32", "float32", reduce_major=True)

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((k_,), "float32", offset_factor=1), B: T.Buffer((k_, lanes), "float32", offset_factor=1),
             C: T.Buffer((lanes,), "float32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:k_], B[0:k_, 0:lanes])
            T.writes(C[0:lanes])
            for k in T.unroll(0, k_):  # LLVM contracts each multiply-add into one vfmadd231ps
                C[T.ramp(T.int32(0), 1, lanes)] = (C.vload([0], dtype=vector)
                                                   + T.broadcast(A[k], lanes) * B.vload([k, 0], dtype=vector))

    TensorIntrin.register(name, desc, impl)
    return name


def _dot_desc(lanes: int, reduce: int, a_dtype: str, b_dtype: str, acc_dtype: str = "int32", pair_aligned: int = 1,
              reduce_major: bool = False):
    """What a dot-product intrinsic computes: C[lanes] += A[reduce] . B[lanes, reduce] (B[reduce, lanes] when
    `reduce_major`), summed in `acc_dtype`; A and B start at multiples of `pair_aligned` elements."""
    from tvm.script import tirx as T

    rows, columns = (reduce, lanes) if reduce_major else (lanes, reduce)

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((reduce,), a_dtype, offset_factor=pair_aligned),
             B: T.Buffer((rows, columns), b_dtype, offset_factor=pair_aligned),
             C: T.Buffer((lanes,), acc_dtype, offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:reduce], B[0:rows, 0:columns])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, reduce):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        if reduce_major:
                            C[vi] = C[vi] + T.cast(A[vk], acc_dtype) * T.cast(B[vk, vi], acc_dtype)
                        else:
                            C[vi] = C[vi] + T.cast(A[vk], acc_dtype) * T.cast(B[vi, vk], acc_dtype)

    return desc
