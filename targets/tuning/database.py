"""The tuning database on disk: MetaSchedule's two JSON-lines files, checked and repaired before opening.

MetaSchedule's JSONDatabase appends one line per workload and one per measured candidate,
opening the file, writing and flushing (`std::endl`) each time (`JSONFileAppendLine` in
src/s_tir/meta_schedule/database/json_database.cc), so a killed tuning run keeps every
record measured so far. What a kill can leave is a truncated last line, and the loader then
refuses the whole database ("parallel_for_dynamic error with Unexpected end of string");
were it opened anyway, the next append would be glued onto the broken line. So every line
is checked here first: a line that is not JSON of the shape the loader expects is dropped,
records are renumbered to the workloads kept, and the files are rewritten atomically.

A record can also be well-formed and still fail to load: its schedule does not replay on its
workload (drop_unreplayable_records says when); those are dropped when the load fails, the rest kept.

Two processes must not write one database at once: each appends with its own count of the
workload lines, so interleaved appends leave records that name the wrong workload (every line
still parses; the loader then fails with "parallel_for_dynamic error"). `database_lock` makes
one build at a time open, repair and tune a folder; the others wait, and say so.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from tensorfold.ir.errors import BuildError, TargetError

from ..registry import Target
from .intrinsics import load_for

WORKLOAD_FILE = "database_workload.json"      # MetaSchedule's own names, so that
RECORD_FILE = "database_tuning_record.json"   # MetaScheduleApplyDatabase(work_dir) reads the folder too
TARGET_FILE = "tensorfold_target.json"
PENDING_SUFFIX = ".repair"  # renumbered records waiting for the workload file's replacement
LOCK_FILE = "tensorfold.lock"  # flock'ed while a build opens, repairs or tunes the folder; names its holder

logger = logging.getLogger(__name__)


@dataclass
class DatabaseRepair:
    """What was dropped from each file, by 1-based line number."""
    directory: str
    dropped: dict[str, list[int]] = field(default_factory=dict)   # file name -> damaged lines
    orphaned: list[int] = field(default_factory=list)  # record lines whose workload line was dropped
    unreplayable: list[int] = field(default_factory=list)  # record lines whose schedule fails on their workload

    def messages(self) -> list[str]:
        texts = [f"{name}: dropped {len(lines)} damaged line(s) (line {_spans(lines)}): not the JSON "
                 "MetaSchedule writes, e.g. cut off by a killed tuning run"
                 for name, lines in self.dropped.items() if lines]
        if self.orphaned:
            texts.append(f"{RECORD_FILE}: dropped {len(self.orphaned)} record(s) (line {_spans(self.orphaned)}) "
                         "whose workload line was damaged or missing")
        if self.unreplayable:
            texts.append(f"{RECORD_FILE}: dropped {len(self.unreplayable)} record(s) (line "
                         f"{_spans(self.unreplayable)}) whose schedule does not replay on their workload: tuned for "
                         "a structurally equal workload whose blocks are named otherwise (another model, or "
                         "another import of this one)")
        return texts


@contextlib.contextmanager
def database_lock(directory: str, purpose: str, on_wait: Callable[[str], None]) -> Iterator[float]:
    """Hold the folder's exclusive lock (fcntl.flock on LOCK_FILE); yields the seconds spent waiting.

    When another process holds it, `on_wait` gets one message naming that process and what it is
    doing, then this one blocks until the lock is free. The kernel releases a flock when its holder
    exits, however it exits, so a killed build never leaves the folder locked.
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, LOCK_FILE)
    try:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise BuildError(f"tuning database {directory}: cannot create its lock file {LOCK_FILE} ({e.strerror}); "
                         "a database folder must be writable (choose another --tuning-db)") from None
    waited = 0.0
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(handle, 400, 0).decode("utf-8", errors="replace").strip() or "another process"
            on_wait(f"tuning database {directory} is in use ({holder}); waiting for it to finish, "
                    "so that the two runs do not write the database at once")
            start = time.monotonic()
            fcntl.flock(handle, fcntl.LOCK_EX)
            waited = time.monotonic() - start
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"pid {os.getpid()}: {purpose}, since {time.strftime('%H:%M:%S')}\n".encode(), 0)
        yield waited
        os.ftruncate(handle, 0)
    finally:
        os.close(handle)  # releases the lock


def open_database(directory: str, target: Target, create: bool):
    """The JSON database in `directory` (repaired first), or None if absent and `create` is False.

    Returns (database or None, DatabaseRepair).
    """
    import tvm.s_tir.meta_schedule as ms

    marker = os.path.join(directory, TARGET_FILE)
    repair = DatabaseRepair(directory)
    if os.path.isfile(marker):
        with open(marker) as f:
            owner = json.load(f).get("key")
        if owner != target.key:
            raise TargetError(f"tuning database {directory} belongs to target key {owner!r}, not {target.key!r} "
                              f"({target.name}); records of another CPU would mislead the tuner: choose another "
                              "--tuning-db")
    elif not create and not os.path.isfile(os.path.join(directory, RECORD_FILE)):
        return None, repair
    os.makedirs(directory, exist_ok=True)
    if not os.path.isfile(marker):
        with open(marker, "w") as f:
            json.dump({"key": target.key, "target": target.tvm_target}, f, indent=1)
    repair = repair_database(directory)
    # records replay as traces that name tensor intrinsics (tensorize): a process that has not built
    # int8 yet must know them before loading, or every record fails to load
    load_for(target.tvm_target)

    def load():
        return ms.database.JSONDatabase(path_workload=os.path.join(directory, WORKLOAD_FILE),
                                        path_tuning_record=os.path.join(directory, RECORD_FILE))
    try:
        try:
            database = load()
        except Exception:  # noqa: BLE001 - one record that does not replay fails the whole load
            repair.unreplayable = drop_unreplayable_records(directory)
            if not repair.unreplayable:
                raise
            logger.warning("tuning database %s: %s", directory, repair.messages()[-1])
            database = load()
    except Exception as e:  # noqa: BLE001 - lines that are JSON of the right shape but not loadable
        raise BuildError(f"tuning database {directory} could not be opened after checking each line: "
                         f"{type(e).__name__}: {str(e)[:500]}; move the folder aside or choose another "
                         "--tuning-db") from e
    return database, repair


def drop_unreplayable_records(directory: str) -> list[int]:
    """Drop the records whose schedule does not replay on their workload; their 1-based line numbers.

    MetaSchedule commits a task's records to a structurally equal workload the database already holds,
    with the trace of the new task, whose blocks can be named otherwise (seen here: a ResNet-18 tuned
    once from an ONNX file and again from torch, "lv88_red" against "lv85_red"). The next load replays
    every trace on its stored workload and fails on such a record, taking the whole database with it.
    Nothing is dropped when a workload line itself does not load (that is not this failure)."""
    import tvm.s_tir.meta_schedule as ms

    record_path = os.path.join(directory, RECORD_FILE)
    try:
        workloads = [ms.database.Workload.from_json(json.loads(line))
                     for line in _read_lines(os.path.join(directory, WORKLOAD_FILE))[0]]
    except Exception:  # noqa: BLE001
        return []
    lines = _read_lines(record_path)[0]
    kept, dropped = [], []
    for number, line in enumerate(lines):
        index, record = json.loads(line)  # the shape was checked by repair_database
        try:
            ms.database.TuningRecord.from_json(record, workloads[index])
            kept.append(line)
        except Exception:  # noqa: BLE001 - TVM raises its own error types here
            dropped.append(number + 1)
    if dropped:
        _write_lines(record_path, kept)
    return dropped


def has_record(database, task, tvm_target) -> bool:
    # has_workload() is not enough: a task is committed as a workload before its first
    # trial, so one cut off by the budget has a workload and no record.
    return database.query_tuning_record(task.dispatched[0], tvm_target, "main") is not None


def repair_database(directory: str) -> DatabaseRepair:
    """Drop every line of the two files that MetaSchedule's loader would choke on; keep all others."""
    repair = DatabaseRepair(directory)
    workload_path = os.path.join(directory, WORKLOAD_FILE)
    record_path = os.path.join(directory, RECORD_FILE)
    pending = record_path + PENDING_SUFFIX
    workload_lines, workload_ok = _read_lines(workload_path)
    kept_workloads, bad_workloads = _check_lines(workload_lines, _is_workload)
    if os.path.isfile(pending):
        if bad_workloads:  # the workload file was not replaced yet: redo the whole repair
            os.remove(pending)
        else:  # renumbered against the workload file now on disk: finish that repair
            os.replace(pending, record_path)
    record_lines, record_ok = _read_lines(record_path)
    kept_records, bad_records = _check_lines(record_lines, _is_record)
    # a record names its workload by line number among the workloads: renumber to the lines kept
    new_index = {old: new for new, (old, _, _) in enumerate(kept_workloads)}
    renumbered, orphaned = [], []
    for number, record, (index, _) in kept_records:
        if index in new_index:
            renumbered.append(record if new_index[index] == index else _with_index(record, new_index[index]))
        else:
            orphaned.append(number + 1)
    repair.dropped = {name: [n + 1 for n in bad] for name, bad in
                      ((WORKLOAD_FILE, bad_workloads), (RECORD_FILE, bad_records)) if bad}
    repair.orphaned = orphaned
    records_changed = bool(bad_records or orphaned or not record_ok
                           or any(new_index[i] != i for i in new_index))
    if bad_workloads or not workload_ok:
        if records_changed:
            # written before the workloads are replaced, so that a crash between the two
            # replacements is finished, not repeated, by the next repair (see above)
            _write_lines(pending, renumbered)
        _write_lines(workload_path, [line for _, line, _ in kept_workloads])
        if records_changed:
            os.replace(pending, record_path)
    elif records_changed:
        _write_lines(record_path, renumbered)
    for message in repair.messages():
        logger.warning("tuning database %s: %s", directory, message)
    return repair


def _read_lines(path: str) -> tuple[list[str], bool]:
    """The file's lines, and whether it is well terminated (an append would start a new line)."""
    if not os.path.isfile(path):
        return [], True
    with open(path, "rb") as f:
        data = f.read()
    # split on "\n" only, as the loader's std::getline does (str.splitlines also splits on U+2028)
    lines = data.decode("utf-8", errors="replace").split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines, not data or data.endswith(b"\n")


def _check_lines(lines: list[str], is_valid) -> tuple[list[tuple[int, str, object]], list[int]]:
    """(line number, line, parsed line) of the lines kept, and the numbers of those dropped."""
    kept, bad = [], []
    for number, line in enumerate(lines):
        try:
            item = json.loads(line)
        except ValueError:
            item = None
        if item is not None and is_valid(item):
            kept.append((number, line, item))
        else:
            bad.append(number)
    return kept, bad


def _is_workload(item) -> bool:
    # [structural hash, base64 of the module's JSON graph]: Workload::FromJSON
    return isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)


def _is_record(item) -> bool:
    # [workload line, [trace, run_secs, target, args_info]]: JSONDatabase + TuningRecord::FromJSON
    return (isinstance(item, list) and len(item) == 2 and isinstance(item[0], int) and not isinstance(item[0], bool)
            and isinstance(item[1], list) and len(item[1]) == 4)


def _with_index(line: str, index: int) -> str:
    # only the leading number changes; the record itself is kept byte for byte
    return f"[{index}," + line[line.index(",") + 1:]


def _write_lines(path: str, lines: list[str]) -> None:
    """Replace `path` atomically: a crash leaves either the old file or the new one, whole."""
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), prefix=os.path.basename(path) + ".")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _spans(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:10])
    return shown + (f" and {len(numbers) - 10} more" if len(numbers) > 10 else "")
