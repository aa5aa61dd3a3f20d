"""A fixed CPU schedule for the kernels that have nothing to tune: no reduction, only data movement.

Layout changes, pads, requantization and elementwise chains are spatial-only TIR functions.
MetaSchedule's CPU space for them is one shape, `ParallelizeVectorizeUnroll` fusing the loops
and vectorizing up to 64 iterations of the fused loop. Where the indices hold the divisions
and modulos of a layout change, that vector is a gather of 64 computed addresses, and no trial
can pick anything else. Measured on a Zen 4 (2 threads), for the u8 NCHW16c -> NCHW4c re-blocking +
pad of a 64-channel 56x56 activation: 1.5 ms as MetaSchedule schedules it, 0.03 ms as written
here. The int64 fixed-point requantization of the same tensor took 1.06 ms unscheduled and 0.04 ms
here. Each such kernel also took a share of the trial budget away from the convs.

So these functions get the schedule below before tuning, are marked scheduled, and are no
tuning tasks: inline the producers, run the outer loops in parallel (fused until there is
enough work to split), and vectorize the innermost loop (split to at most 64 iterations), whose
addresses are the simple ones. Targets compiled by LLVM only: a GPU kernel needs its threads bound,
which tuning does.
"""
from __future__ import annotations

SCHEDULED = "tir.is_scheduled"
MAX_VECTOR = 64     # iterations of the innermost loop in one vector (bytes of a zmm register for u8)
PARALLEL_WORK = 64  # fuse outer loops until this many iterations can be shared between threads


def schedule_injective(mod, tvm_target: dict):
    """`mod` with every unscheduled spatial-only PrimFunc scheduled as above (CPU targets; others
    unchanged). Returns (module, names of the functions scheduled here)."""
    import tvm

    if tvm_target.get("kind") != "llvm":
        return mod, []
    updates = {}
    for gvar, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc) or (func.attrs and SCHEDULED in func.attrs):
            continue
        scheduled = _schedule(func)
        if scheduled is not None:
            updates[gvar] = scheduled.with_attr(SCHEDULED, True)
    if updates:
        mod = mod.copy() if hasattr(mod, "copy") else mod
        for gvar, func in updates.items():
            mod[gvar] = func
    return mod, sorted(g.name_hint for g in updates)


def is_fixed_task(task) -> bool:
    """A MetaSchedule task whose function already has its fixed schedule (nothing to tune)."""
    func = task.dispatched[0]["main"]
    return bool(func.attrs and SCHEDULED in func.attrs)


def _schedule(func):
    """The scheduled function, or None when it reduces, has symbolic loops or does not schedule."""
    import tvm
    from tvm import s_tir
    from tvm.s_tir.schedule.schedule import ScheduleError

    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    try:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except (ScheduleError, RuntimeError):  # no root block: a hand-written kernel
        return None
    if not blocks or not all(_spatial(sch.get(b)) for b in blocks):
        return None
    try:
        for block in blocks[:-1]:  # producers into their consumers, so one loop nest is left
            sch.compute_inline(block)
        if len(sch.get_child_blocks(sch.get_sblock("root"))) != 1:
            return None
        out = blocks[-1]
        loops = sch.get_loops(out)
        extents = [sch.get(loop).extent for loop in loops]
        if not loops or not all(isinstance(e, tvm.tirx.IntImm) for e in extents):
            return None
        extents = [int(e) for e in extents]
        lanes = _vector_lanes(extents[-1])
        vector = None
        if lanes > 1:
            if lanes < extents[-1]:
                loops = [*loops[:-1], *sch.split(loops[-1], [None, lanes])]
                extents = [*extents[:-1], extents[-1] // lanes, lanes]
            vector, loops, extents = loops[-1], loops[:-1], extents[:-1]
        shared, work = 0, 1
        while shared < len(loops) and work < PARALLEL_WORK:
            work *= extents[shared]
            shared += 1
        if shared:
            sch.parallel(sch.fuse(*loops[:shared]) if shared > 1 else loops[0])
        if vector is not None:
            sch.vectorize(vector)
    except (ScheduleError, RuntimeError):
        return None
    return sch.mod["main"]


def _spatial(block) -> bool:
    from tvm.tirx import IterVar

    return all(iv.iter_type == IterVar.DataPar for iv in block.iter_vars)


def _vector_lanes(extent: int) -> int:
    """The largest divisor of the innermost extent that fits one vector (1: not worth it)."""
    lanes = next(d for d in range(min(extent, MAX_VECTOR), 0, -1) if extent % d == 0)
    return lanes if lanes >= 4 else 1
