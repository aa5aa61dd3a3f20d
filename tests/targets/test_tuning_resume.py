"""A tuning run killed with SIGKILL part-way keeps the records it measured; the next build resumes from them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import torch
from torch import nn

import tensorfold as tf
from tensorfold.targets.tuning.database import RECORD_FILE

TRIALS = 8  # two tasks, four candidates each: one batch per task

# The tuning run, in its own process. The scheduler measures every task's first batch before it
# joins any (task_scheduler.cc), then joins them one by one, committing each batch to the
# database before the measure callbacks after it run. Our trial counter is the last callback:
# stalling it after the first batch makes the kill land, every time, after that batch's records
# were written and before the other task's were.
TUNING_RUN = textwrap.dedent("""
    import sys, time
    import torch
    from torch import nn
    import tensorfold as tf
    from tensorfold.targets.tuning import progress as tuning_progress

    count = tuning_progress.TrialProgress.add_measured

    def add_measured(self, n):
        count(self, n)
        with open(sys.argv[2], "w") as f:
            f.write(str(self.done))
        time.sleep(600)  # until killed

    tuning_progress.TrialProgress.add_measured = add_measured
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    tf.build(tf.capture(model, (torch.randn(1, 3, 16, 16),)), "x86", sys.argv[3], tune_trials=TRIALS,
             tuning_db=sys.argv[1], progress=False)
""").replace("TRIALS", str(TRIALS))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


def _kill_after_first_records(tmp_path) -> list[str]:
    """Run the tuning process until it has written records, SIGKILL it, return the record lines on disk."""
    database, stalled = tmp_path / "db", tmp_path / "stalled"
    script = tmp_path / "tuning_run.py"
    script.write_text(TUNING_RUN)
    log = open(tmp_path / "tuning_run.log", "w")
    # its own session, so that killing the group also ends the builder and runner workers
    process = subprocess.Popen([sys.executable, str(script), str(database), str(stalled), str(tmp_path / "killed")],
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (stalled.exists() and (database / RECORD_FILE).exists()):
            assert process.poll() is None, f"the tuning run ended early: {(tmp_path / 'tuning_run.log').read_text()}"
            assert time.monotonic() < deadline, "no record written in 300 s"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log.close()
    return (database / RECORD_FILE).read_text().splitlines()


def test_killed_tuning_run_keeps_its_records_and_the_next_build_tunes_only_the_rest(tmp_path, tools):
    kept = _kill_after_first_records(tmp_path)
    assert 0 < len(kept) <= TRIALS // 2  # the first task's batch, whole lines only (flushed per record)

    model, x = _model(), torch.randn(1, 3, 16, 16)
    artifact = tf.build(tf.capture(model, (x,)), "x86", tmp_path / "resumed", tune_trials=TRIALS // 2,
                        tuning_db=tmp_path / "db", progress=False)

    tuning = artifact.manifest["tuning"]
    assert tuning["database_found"] and tuning["database_repairs"] == []
    assert len(tuning["tasks"]) == 2 and len(tuning["tuned_before"]) == 1  # the killed run's task is not re-tuned
    assert tuning["tuned_now"] == [t for t in tuning["tasks"] if t not in tuning["tuned_before"]]
    assert 0 < tuning["trials_spent"] <= TRIALS // 2
    records = (tmp_path / "db" / RECORD_FILE).read_text().splitlines()
    assert records[:len(kept)] == kept and len(records) == len(kept) + tuning["trials_spent"]
    assert tuning["untuned"] == [] and sorted(tuning["applied"]) == sorted(tuning["tasks"])
    assert tools.relative_error(tools.torch_output(model, x), artifact.load()(x.numpy())["output0"]) < 1e-4
