"""Which MetaSchedule search space each task gets.

Float tasks keep the target's default space. 8-bit integer reductions on x86 need a choice:
on a VNNI CPU MetaSchedule's default adds a rule that tensorizes every u8 x s8 reduction
with TVM's `dot_16x4_vnni`, whose LLVM call no longer verifies (intrinsics.register_vnni),
and which cannot map an NCHW conv or a transposed matmul anyway (the 16 x 4 weight block
is not contiguous there), so every candidate failed and the task stayed untuned. Hence:
- blocked int8 conv2d (targets/int8/layout.py): on x86 the same rules with tensorfold's intrinsic
  for the layout (VNNI's `vpdpbusd`, or AVX2's `vpmaddwd` on s16); on AArch64 with dotprod the
  target's default, whose rules tensorize with sdot;
- other integer tasks: the generic LLVM rules (LLVM's vectoriser still emits VNNI);
- bf16 conv2d on AVX512-BF16 (targets/bf16.py): the tensorizing rules with `vdpbf16ps`
  (intrinsics.BF16_INTRIN);
- blocked fp32 conv2d (targets/float_layout.py, groups 1) on x86: the tensorizing rules with a
  broadcast-FMA step (intrinsics.register_fma), where it fits (not the RGB stem's block of 3 channels,
  which keeps the default space).
"""
from __future__ import annotations

from typing import Any

from ..bf16 import DOT_KERNEL as BF16_KERNEL
from ..float_layout import BLOCKED_DEPTHWISE, BLOCKED_KERNEL as FLOAT_KERNEL, lanes_for
from ..int8.layout import BLOCKED_KERNEL, dot_layout_for
from ..registry import Target

DEFAULT = "post-order-apply"


def spaces(tasks, target: Target) -> list[tuple[list, Any]]:
    """[(tasks, space)] for `extracted_tasks_to_tune_contexts`, empty groups left out."""
    from ..int8.relax import int8_kernels

    if target.tvm_target["kind"] != "llvm":
        return [(list(tasks), DEFAULT)]
    x86 = str(target.tvm_target.get("mtriple", "")).startswith("x86_64")
    layout = dot_layout_for(target.tvm_target) if x86 else None  # registers its intrinsic
    lanes = lanes_for(target.tvm_target)
    kinds = [_kind(t, int8_kernels, lanes) for t in tasks]
    makers = {"float": lambda: DEFAULT, "generic": _generic_llvm,
              "blocked": (lambda: _tensorizing(layout.tensor_intrin)) if layout else lambda: DEFAULT,
              "bf16": _bf16_tensorizing, "float-blocked": _fma_tensorizing(lanes)}  # _kind: only where lanes fit
    return [([t for t, k in zip(tasks, kinds) if k == kind], makers[kind]())
            for kind in ("float", "float-blocked", "generic", "blocked", "bf16") if kind in kinds]


def _kind(task, int8_kernels, lanes: int | None) -> str:
    if BF16_KERNEL in task.task_name:
        return "bf16"
    if not int8_kernels(task.dispatched[0]):  # a reduction of 8-bit products into int32
        blocked = FLOAT_KERNEL in task.task_name and BLOCKED_DEPTHWISE not in task.task_name
        return "float-blocked" if blocked and lanes and _fma_fits(task.dispatched[0], lanes) else "float"
    return "blocked" if BLOCKED_KERNEL in task.task_name else "generic"


def _fma_fits(mod, lanes: int) -> bool:
    """Whether the FMA step tiles this blocked conv: its input channel block holds whole steps and its
    output block is `lanes` wide. The RGB stem's block is its 3 channels: it gets the default space,
    whose layout rewrite packs its 7x7x3 weights for its schedule (on the Zen 4, 32 cold-timed trials
    each: 1.27 ms there, 3.9 ms in the tensorizing space without a step and without that rewrite)."""
    import tvm

    from .intrinsics import FMA_REDUCE

    sch = tvm.s_tir.Schedule(mod)
    try:
        loops = sch.get_loops(sch.get_sblock(FLOAT_KERNEL))
    except Exception:  # noqa: BLE001  (no such block: the compute is not the blocked conv's)
        return False
    extents = [sch.get(loop).extent for loop in loops]  # b, oc block, y, x, oc lane, ic block, ky, kx, ic lane
    return len(extents) == 9 and int(extents[4]) == lanes and int(extents[8]) % FMA_REDUCE == 0


def _generic_llvm():
    import tvm.s_tir.meta_schedule as ms

    return ms.space_generator.PostOrderApply(sch_rules="llvm", postprocs="llvm", mutator_probs="llvm")


def _bf16_tensorizing():
    from .intrinsics import BF16_INTRIN, register_avx512_bf16

    register_avx512_bf16()
    return _tensorizing(BF16_INTRIN)


def _fma_tensorizing(lanes: int):
    def make():
        from .intrinsics import register_fma

        # the weights are in the step's order already (OIHW{ib}i{lanes}o); a layout rewrite of them
        # failed the build's weight prepacking (remove_weight_layout_rewrite_block: "ind.as<PrimVar>()")
        return _tensorizing(register_fma(lanes), rewrite_layout=False)
    return make


def _tensorizing(intrin: str, rewrite_layout: bool = True):
    """TVM's DefaultX86("vnni") rules and CPU tensorization postprocs, with our intrinsic `intrin`."""
    import tvm.s_tir.meta_schedule as ms

    rule, post = ms.schedule_rule, ms.postproc
    write = rule.ReuseType(req="may", levels=[1, 2], scope="global")
    rules = [
        rule.ApplyCustomRule(),
        rule.InlineConstantScalars(),
        rule.AutoInline(into_producer=False, into_consumer=True, inline_const_tensor=True,
                        disallow_if_then_else=True, require_injective=True, require_ordered=True,
                        disallow_op=["tirx.exp"]),
        rule.AddRFactor(max_jobs_per_core=16, max_innermost_factor=64),
        rule.MultiLevelTilingWithIntrin(intrin, structure="SSRSRS", max_innermost_factor=64, reuse_write=write),
        rule.MultiLevelTiling(structure="SSRSRS", max_innermost_factor=64, reuse_write=write),
        rule.ParallelizeVectorizeUnroll(max_jobs_per_core=16, max_vectorize_extent=64,
                                        unroll_max_steps=[0, 16, 64, 512], unroll_explicit=True),
        rule.RandomComputeLocation(),
    ]
    postprocs = [post.DisallowDynamicLoop(), post.RewriteParallelVectorizeUnroll(), post.RewriteReductionBlock(),
                 post.RewriteTensorize(vectorize_init_loop=True)] + ([post.RewriteLayout()] if rewrite_layout else [])
    return ms.space_generator.PostOrderApply(sch_rules=rules, postprocs=postprocs, mutator_probs="llvm")
