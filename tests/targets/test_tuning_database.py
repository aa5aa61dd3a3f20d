"""Repairing a tuning database's two JSON-lines files (no TVM: lines of the shape MetaSchedule writes), and its lock."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tensorfold.targets.tuning.database import (LOCK_FILE, PENDING_SUFFIX, RECORD_FILE, WORKLOAD_FILE, database_lock,
                                                open_database, repair_database)


def _workload(n: int) -> str:
    return json.dumps([str(1000 + n), f"bW9kdWxl{n}"], separators=(",", ":"))


def _record(index: int, seconds: float) -> str:
    trace = [[["GetSBlock", [], ["conv", "main"], ["b0"]]], []]
    return json.dumps([index, [trace, [seconds], {"kind": "llvm"}, []]], separators=(",", ":"))


def _write(folder, name: str, lines: list[str], end: str = "\n") -> None:
    (folder / name).write_text("\n".join(lines) + end)


def _lines(folder, name: str) -> list[str]:
    text = (folder / name).read_text()
    assert text == "" or text.endswith("\n"), f"{name} must end with a newline, so that an append starts a line"
    return text.splitlines()


def test_truncated_last_line_and_garbage_line_are_dropped_and_the_rest_kept(tmp_path):
    workloads = [_workload(0), _workload(1)]
    records = [_record(0, 1e-5), _record(1, 2e-5), _record(0, 3e-5), _record(1, 4e-5)]
    _write(tmp_path, WORKLOAD_FILE, workloads)
    # a garbage line in the middle, and the last line cut off mid-write (no newline)
    _write(tmp_path, RECORD_FILE, records[:2] + ["}{ not json"] + records[2:] + [_record(0, 5e-5)[:37]], end="")

    repair = repair_database(str(tmp_path))

    assert _lines(tmp_path, RECORD_FILE) == records  # every good line, byte for byte, in order
    assert _lines(tmp_path, WORKLOAD_FILE) == workloads
    assert repair.dropped == {RECORD_FILE: [3, 6]} and repair.orphaned == []
    assert repair.messages() == [f"{RECORD_FILE}: dropped 2 damaged line(s) (line 3, 6): not the JSON MetaSchedule "
                                 "writes, e.g. cut off by a killed tuning run"]
    assert sorted(os.listdir(tmp_path)) == sorted([WORKLOAD_FILE, RECORD_FILE])  # no temporary file left


def test_damaged_workload_line_renumbers_the_records_after_it(tmp_path):
    _write(tmp_path, WORKLOAD_FILE, [_workload(0), '["1001", "bW9k', _workload(2)])
    _write(tmp_path, RECORD_FILE, [_record(2, 1e-5), _record(1, 2e-5), _record(0, 3e-5), _record(7, 4e-5),
                                   '[true, [1, 2, 3, 4]]'])

    repair = repair_database(str(tmp_path))

    assert _lines(tmp_path, WORKLOAD_FILE) == [_workload(0), _workload(2)]
    # records of workload 2 now point at line 1; the record of the damaged workload and the one
    # with an index past the end have nothing to replay against
    assert _lines(tmp_path, RECORD_FILE) == [_record(1, 1e-5), _record(0, 3e-5)]
    assert repair.dropped == {WORKLOAD_FILE: [2], RECORD_FILE: [5]} and repair.orphaned == [2, 4]


def test_a_repair_cut_off_between_its_two_file_replacements_is_finished_not_repeated(tmp_path):
    # state after the workload file was replaced but before the renumbered records were moved in
    _write(tmp_path, WORKLOAD_FILE, [_workload(0), _workload(2)])
    _write(tmp_path, RECORD_FILE, [_record(2, 1e-5), _record(0, 3e-5)])
    _write(tmp_path, RECORD_FILE + PENDING_SUFFIX, [_record(1, 1e-5), _record(0, 3e-5)])

    repair_database(str(tmp_path))

    assert _lines(tmp_path, RECORD_FILE) == [_record(1, 1e-5), _record(0, 3e-5)]  # not shifted a second time
    assert not (tmp_path / (RECORD_FILE + PENDING_SUFFIX)).exists()


def test_a_repair_cut_off_before_replacing_the_workloads_is_redone(tmp_path):
    _write(tmp_path, WORKLOAD_FILE, [_workload(0), "garbage", _workload(2)])
    _write(tmp_path, RECORD_FILE, [_record(2, 1e-5), _record(0, 3e-5)])
    _write(tmp_path, RECORD_FILE + PENDING_SUFFIX, [_record(1, 1e-5)])  # stale: may be incomplete

    repair_database(str(tmp_path))

    assert _lines(tmp_path, RECORD_FILE) == [_record(1, 1e-5), _record(0, 3e-5)]
    assert not (tmp_path / (RECORD_FILE + PENDING_SUFFIX)).exists()


def test_good_last_line_without_newline_gets_one(tmp_path):
    _write(tmp_path, WORKLOAD_FILE, [_workload(0)])
    _write(tmp_path, RECORD_FILE, [_record(0, 1e-5), _record(0, 2e-5)], end="")

    repair = repair_database(str(tmp_path))

    assert _lines(tmp_path, RECORD_FILE) == [_record(0, 1e-5), _record(0, 2e-5)]
    assert repair.messages() == []


def test_intact_database_is_not_rewritten(tmp_path):
    _write(tmp_path, WORKLOAD_FILE, [_workload(0)])
    _write(tmp_path, RECORD_FILE, [_record(0, 1e-5)])
    before = {name: os.stat(tmp_path / name).st_ino for name in (WORKLOAD_FILE, RECORD_FILE)}

    assert repair_database(str(tmp_path)).messages() == []
    assert before == {name: os.stat(tmp_path / name).st_ino for name in (WORKLOAD_FILE, RECORD_FILE)}


def test_lines_of_the_right_shape_that_tvm_cannot_load_give_an_error_naming_the_folder(tmp_path):
    from tensorfold.ir.errors import BuildError
    from tensorfold.targets import get_target

    _write(tmp_path, WORKLOAD_FILE, [_workload(0)])  # JSON of the right shape, but no module inside
    (tmp_path / RECORD_FILE).write_text("")
    with pytest.raises(BuildError, match=f"tuning database {tmp_path} could not be opened"):
        open_database(str(tmp_path), get_target("x86"), create=False)


def _real_workload_and_record(block: str, seconds: float) -> tuple[str, str]:
    """A workload line and a record line as MetaSchedule writes them: a 64-element kernel whose block is
    "y", and a schedule (split by 16) whose trace names `block`."""
    import tvm
    import tvm.s_tir.meta_schedule as ms
    from tvm import s_tir, te

    x = te.placeholder((64,), "float32", name="x")
    mod = tvm.IRModule({"main": te.create_prim_func([x, te.compute((64,), lambda i: x[i] * 2.0, name="y")])})
    sch = s_tir.Schedule(mod)
    sch.split(sch.get_loops(sch.get_sblock("y"))[0], [None, 16])
    workload = ms.database.Workload(mod)
    record = ms.database.TuningRecord(sch.trace, workload, run_secs=[seconds],
                                      target=tvm.target.Target({"kind": "llvm"}),
                                      args_info=ms.arg_info.ArgInfo.from_prim_func(mod["main"]))
    trace = json.dumps(record.as_json()).replace('["y", "main"]', json.dumps([block, "main"]))
    return json.dumps(workload.as_json()), f"[0, {trace}]"


def test_records_whose_schedule_does_not_replay_are_dropped_and_the_rest_load(tmp_path, caplog):
    # what a second import of the same model writes: a structurally equal workload is already in the
    # database, and the new task's records name its own blocks ("lv88_red" where the stored one has "y")
    from tensorfold.targets import get_target

    workload, good = _real_workload_and_record("y", 2e-5)
    _, foreign = _real_workload_and_record("lv88_red", 1e-5)
    assert "lv88_red" in foreign
    _write(tmp_path, WORKLOAD_FILE, [workload])
    _write(tmp_path, RECORD_FILE, [good, foreign, good])

    database, repair = open_database(str(tmp_path), get_target("x86"), create=False)

    assert repair.unreplayable == [2]
    assert "line 2" in repair.messages()[-1] and "does not replay" in repair.messages()[-1]
    assert _lines(tmp_path, RECORD_FILE) == [good, good]
    assert len(database) == 2
    assert "does not replay" in caplog.text


# A second process that takes the folder's lock, says so on stdout, and holds it until its stdin closes.
HOLDER = textwrap.dedent("""
    import sys
    from tensorfold.targets.tuning.database import database_lock
    with database_lock(sys.argv[1], "tuning 3 task(s) for x86", print):
        print("held", flush=True)
        sys.stdin.read()
""")


def _start_holder(folder) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_the_lock_waits_for_another_process_and_names_it(tmp_path):
    holder = _start_holder(tmp_path)
    messages = []
    try:
        with pytest.raises(TimeoutError):  # it blocks while the other process holds the folder
            signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError()))
            signal.alarm(2)
            with database_lock(str(tmp_path), "reading records for x86", messages.append):
                pass
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
    assert len(messages) == 1
    assert f"tuning database {tmp_path} is in use (pid {holder.pid}: tuning 3 task(s) for x86, since" in messages[0]

    messages.clear()
    holder.stdin.close()  # the holder finishes ...
    threshold = time.monotonic()
    with database_lock(str(tmp_path), "reading records for x86", messages.append) as waited:
        assert (tmp_path / LOCK_FILE).read_text().startswith(f"pid {os.getpid()}: reading records for x86")
    assert holder.wait(10) == 0
    assert waited <= time.monotonic() - threshold + 0.01  # ... and this one went on once it was free
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released: it names nobody


def test_a_killed_holder_leaves_the_folder_unlocked(tmp_path):
    holder = _start_holder(tmp_path)
    holder.kill()
    holder.wait(10)
    messages = []
    with database_lock(str(tmp_path), "tuning", messages.append) as waited:
        assert waited == 0.0
    assert messages == []


def test_two_writers_one_after_the_other_keep_every_record_on_its_workload(tmp_path):
    # Each writer appends workloads and records that index its own count of workload lines, as
    # MetaSchedule's JSONDatabase does; under the lock they run one after the other.
    writer = textwrap.dedent("""
        import json, os, sys, time
        from tensorfold.targets.tuning.database import database_lock
        folder, tag = sys.argv[1], sys.argv[2]
        print("ready", flush=True)
        sys.stdin.read()  # both start writing at once
        with database_lock(folder, "writer " + tag, lambda m: None):
            path = os.path.join(folder, "database_workload.json")
            count = sum(1 for _ in open(path)) if os.path.exists(path) else 0
            for n in range(20):
                with open(path, "a") as f:
                    f.write(json.dumps([tag + str(n), "x"]) + "\\n")
                with open(os.path.join(folder, "database_tuning_record.json"), "a") as f:
                    f.write(json.dumps([count + n, tag + str(n)]) + "\\n")
                time.sleep(0.01)
    """)
    writers = [subprocess.Popen([sys.executable, "-c", writer, str(tmp_path), tag], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True) for tag in "ab"]
    assert [w.stdout.readline() for w in writers] == ["ready\n"] * 2
    for w in writers:
        w.stdin.close()
    assert [w.wait(60) for w in writers] == [0, 0]
    workloads = [json.loads(line)[0] for line in (tmp_path / WORKLOAD_FILE).read_text().splitlines()]
    records = [json.loads(line) for line in (tmp_path / RECORD_FILE).read_text().splitlines()]
    assert len(records) == 40 and all(workloads[index] == name for index, name in records)


def test_a_database_folder_that_cannot_hold_a_lock_file_gives_an_error_naming_it(tmp_path):
    from tensorfold.ir.errors import BuildError

    (tmp_path / LOCK_FILE).mkdir()  # the lock file's path is taken (as root, a read-only folder would not stop it)
    with pytest.raises(BuildError, match=f"tuning database {tmp_path}: cannot create its lock file"):
        with database_lock(str(tmp_path), "tuning", print):
            pass
