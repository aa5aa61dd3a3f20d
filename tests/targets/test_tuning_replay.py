"""Applying a database's records function by function: a record that does not replay leaves its function
untuned and named, the others are still applied (targets/tuning/tune.py `_apply_database`)."""
from __future__ import annotations

import pytest

tvm = pytest.importorskip("tvm")


def _matmul():
    from tvm import te

    a, b = te.placeholder((16, 16), name="A"), te.placeholder((16, 16), name="B")
    k = te.reduce_axis((0, 16), name="k")
    return te.create_prim_func([a, b, te.compute((16, 16), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")])


def _add_one():
    from tvm import te

    a = te.placeholder((16, 16), name="A")
    return te.create_prim_func([a, te.compute((16, 16), lambda i, j: a[i, j] + 1.0, name="E")])


def test_a_record_that_cannot_be_replayed_leaves_its_function_untuned_and_the_others_scheduled(tmp_path):
    import tvm.s_tir.meta_schedule as ms
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    from tensorfold.targets.tuning.tune import _apply_database

    target = tvm.target.Target({"kind": "llvm"})
    database = ms.database.JSONDatabase(work_dir=str(tmp_path))
    matmul_workload = database.commit_workload(_normalize_mod(_matmul()))
    add_workload = database.commit_workload(_normalize_mod(_add_one()))
    schedule = tvm.s_tir.Schedule(_normalize_mod(_matmul()))
    i, _, _ = schedule.get_loops(schedule.get_sblock("C"))
    schedule.split(i, [4, 4])
    # The add's record carries the matmul's trace ("GetSBlock C"): what a record pointing at the wrong
    # workload line replays (seen after two builds wrote one database at once).
    for workload, func in ((matmul_workload, _matmul()), (add_workload, _add_one())):
        database.commit_tuning_record(ms.database.TuningRecord(
            schedule.trace, workload, [1e-5], target, ms.arg_info.ArgInfo.from_prim_func(func)))
    mod = tvm.IRModule({"matmul": _matmul(), "add_one": _add_one()})

    scheduled, applied, failed = _apply_database(mod, database, target)

    assert applied == ["matmul"] and failed == ["add_one"]
    assert scheduled["matmul"].attrs["tir.is_scheduled"] and scheduled["matmul"].attrs["global_symbol"] == "matmul"
    assert "i_0, i_1, j, k in T.grid(4, 4, 16, 16)" in scheduled["matmul"].script()  # the split replayed
    assert "tir.is_scheduled" not in (scheduled["add_one"].attrs or {})  # left as it was, to be compiled untuned
