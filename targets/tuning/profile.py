"""Where a tuned model's time goes: each task's best measured run time, FLOPs and GFLOP/s.

The figures are the ones MetaSchedule prints in its per-iteration table (FLOPs from
`tvm.s_tir.analysis.estimate_tir_flops` of the task's module, as TaskRecord does; run time
from the best record in the database), kept in the build's summary so that the tasks worth
more trials can be found without reading the logs. A task's share is its weight (calls per
inference) times its best run time, over the sum for all tasks that have a record.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class TaskProfile:
    name: str
    weight: int                  # calls per inference
    flops: float                 # per call
    best_us: float | None = None  # None: no valid record, the task runs untuned
    gflops: float | None = None
    share: float | None = None   # of the recorded tasks' summed weighted run time


def profile_tasks(tasks, database, tvm_target) -> list[dict]:
    """One TaskProfile (as a dict) per extracted task, largest share of time first."""
    from tvm.s_tir.analysis import estimate_tir_flops

    profiles = []
    for task in tasks:
        profile = TaskProfile(task.task_name, int(task.weight), float(estimate_tir_flops(task.dispatched[0])))
        record = None if database is None else database.query_tuning_record(task.dispatched[0], tvm_target, "main")
        run_secs = [float(s) for s in record.run_secs] if record is not None and record.run_secs else []
        if run_secs:
            seconds = sum(run_secs) / len(run_secs)
            profile.best_us = round(seconds * 1e6, 3)
            profile.gflops = round(profile.flops / seconds / 1e9, 2)
        profiles.append(profile)
    total = sum(p.weight * p.best_us for p in profiles if p.best_us is not None)
    for profile in profiles:
        if profile.best_us is not None and total > 0:
            profile.share = round(profile.weight * profile.best_us / total, 4)
    profiles.sort(key=lambda p: -1.0 if p.share is None else p.share, reverse=True)
    return [asdict(p) for p in profiles]


def top_tasks(profile: list[dict], count: int = 5) -> list[str]:
    """Lines for a report: the tasks with the largest share of time."""
    return [f"{p['name']}: {100 * p['share']:.1f}% of time, {p['best_us']:.1f} us x{p['weight']}, "
            f"{p['gflops']:.1f} GFLOP/s" for p in profile[:count] if p["share"] is not None]
