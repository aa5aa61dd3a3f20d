"""MetaSchedule tuning against one database per target, reused by every later build.

A build extracts its tuning tasks, asks the database which already have a measured
record, and tunes only the rest within the trial budget; the trials actually spent are
counted by a measure callback, not inferred from the budget. Logs go to files under the
build's work dir (MetaSchedule prints a table per iteration otherwise).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import cloudpickle

from tensorfold.ir.errors import BuildError, TargetError

from ..int8.amx import is_amx_task
from ..registry import Target
from .database import database_lock, has_record, open_database
from .injective import is_fixed_task, schedule_injective
from .logs import metaschedule_logging
from .profile import profile_tasks
from .spaces import spaces
from .progress import TrialProgress, native_stderr_to

logger = logging.getLogger(__name__)

TIMEOUT_SEC = 300  # the builder's 30 s default is too short here (docs/toolchain.md#metaschedule)


@dataclass
class TuningSummary:
    database: str
    budget: int
    database_found: bool = False   # False: no database yet at that path, nothing to reuse
    trials_spent: int = 0
    seconds: float = 0.0
    tasks: list[str] = field(default_factory=list)
    tuned_before: list[str] = field(default_factory=list)   # had records: no trials spent on them
    tuned_now: list[str] = field(default_factory=list)
    untuned: list[str] = field(default_factory=list)        # compiled without a schedule (untuned code)
    replay_failed: list[str] = field(default_factory=list)  # a record exists but did not replay: kept untuned
    applied: list[str] = field(default_factory=list)        # functions compiled with a schedule from the database
    fixed: list[str] = field(default_factory=list)          # data movement only: a fixed schedule, not tuned (injective.py)
    database_repairs: list[str] = field(default_factory=list)  # damaged lines dropped before opening
    lock_wait_seconds: float = 0.0  # waiting for another build that held the database
    task_profile: list[dict] = field(default_factory=list)  # profile.TaskProfile, largest share first
    log_dir: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def default_database_dir(target: Target) -> str:
    """`$TENSORFOLD_TUNING_DIR/<key>`, else the user cache: `~/.cache/tensorfold/tuning/<key>`."""
    root = os.environ.get("TENSORFOLD_TUNING_DIR")
    if not root:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(cache, "tensorfold", "tuning")
    return os.path.join(root, target.key)


def tune(mod, target: Target, database_dir: str, trials: int, work_dir: str, progress: bool,
         further: bool = False):
    """Tune what the database lacks, then apply it. Returns (module with schedules, summary).

    further: spend the budget on every task, those with records too: the search starts from
    the database's best schedules, so a second budget improves on the first instead of being
    skipped (by default a task with a record is never tuned again).
    Logs go to `work_dir`/logs: MetaSchedule's per-task logs and TVM's native stderr.
    """
    import tvm.s_tir.meta_schedule as ms

    from tensorfold.runtime.engines import tvm_threads_default

    tvm_threads_default()  # the runner's workers inherit it: candidates are timed on every core
    tvm_target = target.tvm()
    mod, fixed = schedule_injective(mod, target.tvm_target)
    # the AMX conv (int8/amx.py) and the data-movement kernels have fixed schedules: nothing to tune or replay
    tasks = [t for t in ms.relax_integration.extract_tasks(mod, tvm_target)
             if not is_amx_task(t) and not is_fixed_task(t)]
    summary = TuningSummary(database=database_dir, budget=trials, tasks=[t.task_name for t in tasks], fixed=fixed)
    # Held from opening (which may repair the files) to the end of tuning; the records are then
    # in memory, so applying them needs no lock. No folder and nothing to tune: nothing to lock.
    lock = (database_lock(database_dir, f"tuning {len(tasks)} task(s) for {target.name}" if trials > 0 else
                          f"reading records for {target.name}", _lock_notice(progress))
            if trials > 0 or os.path.isdir(database_dir) else contextlib.nullcontext(0.0))
    with lock as waited:
        summary.lock_wait_seconds = round(waited, 2)
        database, repair = open_database(database_dir, target, create=False)
        summary.database_repairs = repair.messages()
        summary.database_found = database is not None
        recorded = [database is not None and has_record(database, t, tvm_target) for t in tasks]
        todo = list(tasks) if further else [t for t, done in zip(tasks, recorded) if not done]
        summary.tuned_before = [t.task_name for t, done in zip(tasks, recorded) if done]
        if trials > 0 and todo:
            if not target.runs_here:
                _check_remote(target)
            if database is None:
                database, _ = open_database(database_dir, target, create=True)
            start = time.perf_counter()
            summary.trials_spent = _tune_tasks(todo, database, target, trials, work_dir, progress)
            summary.seconds = round(time.perf_counter() - start, 2)
            summary.log_dir = os.path.join(work_dir, "logs")
    summary.task_profile = profile_tasks(tasks, database, tvm_target)
    if database is None:
        summary.untuned = list(summary.tasks)
        return mod, summary
    summary.tuned_now = [t.task_name for t in todo if has_record(database, t, tvm_target)] if summary.trials_spent else []
    mod, summary.applied, summary.replay_failed = _apply_database(mod, database, tvm_target)
    # judged by what is compiled, not by what the database holds: a task is named after one of
    # its functions (task_extraction.cc), and a function left without a schedule runs untuned code
    summary.untuned = [name for name in summary.tasks if name not in summary.applied]
    summary.untuned += [name for name in summary.replay_failed if name not in summary.untuned]
    return mod, summary


def _lock_notice(progress: bool):
    """Where the message goes when a build waits for another one's database: the user's terminal
    when progress is shown, the log otherwise."""
    def notice(message: str) -> None:
        if progress:
            print(f"tensorfold: {message}", file=sys.stderr, flush=True)
        else:
            logger.warning(message)
    return notice


def _cross_compiler(target: Target) -> str | None:
    """The compiler that links a candidate for a remote device (None: a tracker cannot reach it)."""
    from ..linking import NDK_ENV

    if target.link == "cross-gcc":
        return target.cross_compiler
    if target.link == "tar":  # android: the NDK's clang, when the user has one
        return os.environ.get(NDK_ENV)
    return None


def _check_remote(target: Target) -> None:
    """Tuning on a device over RPC: a tracker that hands out the device, and a compiler for its .so."""
    from ..linking import NDK_ENV
    from ..rpc import RpcError, registered_keys, tracker_summary

    placement = target.placement
    where = placement.describe(target.device)
    if placement.kind != "tracker" or target.device != "cpu":
        raise TargetError(
            f"target {target.name}: tuning measures candidates on the device ({where}); MetaSchedule's RPC "
            "runner reaches CPU devices through a tracker only: give --rpc-tracker HOST:PORT --rpc-key KEY, "
            "or build with --tune-trials 0 (records already in the database are still applied)")
    if _cross_compiler(target) is None:
        raise TargetError(f"target {target.name}: tuning on the phone needs each candidate linked into a .so: "
                          f"set {NDK_ENV} to the NDK's aarch64 clang++, or build with --tune-trials 0")
    try:
        keys = registered_keys(tracker_summary(placement.host, placement.port))
    except RpcError as e:
        raise TargetError(f"target {target.name}: cannot tune, {e}") from None
    if placement.key not in keys:
        raise TargetError(f"target {target.name}: cannot tune, no device registered under key {placement.key!r} at "
                          f"tracker {placement.host}:{placement.port} (registered: {keys or 'none'})")


# Each candidate timed as the network runs it: caches flushed before every call but for its first
# argument (the activations, which the kernel before it has just written), so the weights come from
# memory. MetaSchedule's default (3 calls back to back, >= 100 ms) times them hot, and a model's weights
# (45 MB for ResNet-18 in fp32) do not stay in cache between layers. Measured on the Zen 4, ResNet-18
# fp32, 200 trials each, one run each: the tuned tasks summed to 22.9 ms hot-timed and the network ran
# 24.6 ms; cold-timed, 21.9 and 22.0 ms (docs/toolchain.md). CPU targets only: the flush reads its
# arguments as host memory.
COLD_CACHE = {"number": 1, "repeat": 10, "min_repeat_ms": 0, "enable_cpu_cache_flush": True}


def _runner(target: Target):
    """LocalRunner here; for a device behind a tracker, MetaSchedule's RPCRunner (one session at a time)."""
    import tvm.s_tir.meta_schedule as ms

    from . import worker as tuning_worker

    if target.runs_here:
        cpu = target.tvm_target["kind"] == "llvm"
        return ms.runner.LocalRunner(timeout_sec=TIMEOUT_SEC,
                                     evaluator_config=ms.runner.EvaluatorConfig(**COLD_CACHE) if cpu else None)
    placement = target.placement
    config = ms.runner.RPCConfig(tracker_host=placement.host, tracker_port=placement.port,
                                 tracker_key=placement.key, session_timeout_sec=TIMEOUT_SEC)
    return ms.runner.RPCRunner(rpc_config=config, max_workers=1, f_alloc_argument=tuning_worker.alloc_from_host)


def _apply_database(mod, database, tvm_target) -> tuple[object, list[str], list[str]]:
    """The database's best schedule for every PrimFunc that has one, function by function.

    What `relax.transform.MetaScheduleApplyDatabase` does, except that a record that cannot be
    replayed leaves its function unscheduled (and named) instead of failing the whole build:
    one database serves several models, and a workload that is structurally equal to one tuned
    for another model can have other block names, so replaying its trace fails (seen here:
    "Cannot find a block with the name: lv270_red" on a compressed MobileNet-v2).
    """
    import tvm
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod
    from tvm.s_tir.schedule.schedule import ScheduleError

    failed = []
    updates = {}
    with tvm_target:
        for gvar, func in mod.functions_items():
            if not isinstance(func, tvm.tirx.PrimFunc) or func.attrs and "tir.is_scheduled" in func.attrs:
                continue
            try:
                schedule = database.query_schedule(_normalize_mod(func), tvm_target, gvar.name_hint)
            # one function at a time, on purpose; ScheduleError and TVM's errors (tvm.error.*) are RuntimeErrors
            # (TVM 0.27 has no tvm.TVMError: naming it turned every replay failure into an AttributeError)
            except (ScheduleError, RuntimeError):
                failed.append(gvar.name_hint)
                continue
            if schedule is not None:
                scheduled = schedule.mod["main"].with_attr("tir.is_scheduled", True)
                # the replayed function is called "main" in its own module; keep this module's name
                updates[gvar] = scheduled.with_attr("global_symbol", gvar.name_hint)
    if updates:
        mod = mod.copy() if hasattr(mod, "copy") else mod
        for gvar, func in updates.items():
            mod[gvar] = func
    return mod, sorted(g.name_hint for g in updates), failed


def _tune_tasks(tasks, database, target: Target, trials: int, work_dir: str, progress: bool) -> int:
    import tvm.s_tir.meta_schedule as ms

    from . import worker as tuning_worker
    from .intrinsics import load_for

    # By value, so that builder workers need not import tensorfold (and with it torch).
    cloudpickle.register_pickle_by_value(tuning_worker)

    per_task = max(1, trials // len(tasks))
    # Search rounds: MetaSchedule retrains its cost model (XGBoost) after each round of a task.
    # One round of the whole share (what num_trials_per_iter = per_task gives) never uses what
    # the model learnt; ~4 rounds do. A task may take up to 3 shares: the gradient task
    # scheduler then moves trials to the tasks whose latency (x occurrences) falls the most.
    per_round = min(64, max(per_task // 4, min(per_task, 8)))
    per_task_cap = min(trials, 3 * max(per_task, per_round))
    cores = int(target.tvm_target.get("num-cores") or os.cpu_count() or 1)
    counter = TrialProgress(total=min(trials, per_task_cap * len(tasks)), enabled=progress,
                            description=f"tuning {len(tasks)} task(s) for {target.name}")
    with counter, native_stderr_to(os.path.join(work_dir, "logs", "tvm_stderr.log")), metaschedule_logging() as logs:
        counter.phase("preparing search spaces")
        load_for(target.tvm_target)
        compiler = None if target.runs_here else _cross_compiler(target)
        builder = ms.builder.LocalBuilder(
            max_workers=os.cpu_count() or 1, timeout_sec=TIMEOUT_SEC, f_build=tuning_worker.build_candidate,
            f_export=functools.partial(tuning_worker.export_cross, compiler=compiler) if compiler else None)
        contexts, weights = [], []
        for group, space in spaces(tasks, target):
            logs.before_config()
            made, group_weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                group, work_dir=work_dir, num_threads=cores, space=space,
                # A population sized to the budget: the default 512 spends minutes evolving
                # candidates for a budget of a few trials.
                strategy=ms.search_strategy.EvolutionarySearch(population_size=min(512, max(64, 16 * per_round))))
            contexts += list(made)
            weights += list(group_weights)
            logs.after_config()
        counter.phase("tuning")
        try:
            ms.tune.tune_tasks(
                tasks=contexts, task_weights=weights, work_dir=work_dir,
                max_trials_global=trials, max_trials_per_task=per_task_cap,
                num_trials_per_iter=per_round,
                builder=counter.builder(builder),
                runner=_runner(target),
                database=database,
                measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), counter.callback()])
        except Exception as e:  # noqa: BLE001
            raise BuildError(f"tuning for {target.name} failed after {counter.done} trial(s): "
                             f"{type(e).__name__}: {e} (logs: {os.path.join(work_dir, 'logs')})") from e
    return counter.done
