"""MetaSchedule tuning: a handful of trials, then later builds reuse the database instead of re-tuning."""
from __future__ import annotations

import io
import json
import logging
import shutil

import pytest
import torch
from torch import nn

import tensorfold as tf
from tensorfold.targets.tuning.database import RECORD_FILE, WORKLOAD_FILE

TRIALS = 4  # a handful: tuning is slow on 2 cores; what is tested is the bookkeeping and reuse


def _conv_relu() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).eval()


def _records(database) -> int:
    return len((database / RECORD_FILE).read_text().splitlines())


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One tuned build shared by the tests below (the expensive part: ~1 min on 2 busy cores)."""
    root = tmp_path_factory.mktemp("tuning")
    model, x = _conv_relu(), torch.randn(1, 3, 16, 16)
    artifact = tf.build(tf.capture(model, (x,)), "x86", root / "first", tune_trials=TRIALS,
                        tuning_db=root / "db", progress=False)
    return root, model, x, artifact


def test_tuned_build_spends_its_trials_and_is_correct(tuned, tools):
    root, model, x, artifact = tuned
    tuning = artifact.manifest["tuning"]
    assert tuning["budget"] == TRIALS
    assert 0 < tuning["trials_spent"] <= TRIALS
    assert tuning["tuned_before"] == [] and tuning["untuned"] == []
    assert sorted(tuning["tuned_now"]) == sorted(tuning["tasks"])
    assert tuning["database"] == str(root / "db") and _records(root / "db") >= tuning["trials_spent"]
    # MetaSchedule's logs are kept in files under the artifact folder
    assert list((root / "first" / "logs").rglob("*.log"))
    # the tuned conv reads its weight in the layout its schedule chose, packed once at load
    # (RewriteLayout + LiftTransformParams); the output check below covers the packed weights
    assert artifact.manifest["prepacked_weights"] is True
    # the profile comes from the best record of each task: its FLOPs are the conv's own (2 x MACs
    # + bias + relu, counted here) and the shares of time add up to one
    (task,) = tuning["task_profile"]
    assert task["flops"] == 2 * 8 * 16 * 16 * 3 * 3 * 3 + 2 * 8 * 16 * 16
    # gflops is rounded to 2 decimals: on a loaded machine (ms per run) that rounding exceeds 1 %
    assert task["best_us"] > 0 and task["gflops"] == pytest.approx(task["flops"] / task["best_us"] / 1e3, rel=0.01, abs=0.005)
    assert task["share"] == 1.0
    error = tools.relative_error(tools.torch_output(model, x), artifact.load()(x.numpy())["output0"])
    assert error < 1e-4


def test_second_build_reuses_the_database_without_new_trials(tuned, tools):
    root, model, x, first = tuned
    records_before = _records(root / "db")
    graph = tf.capture(model, (x,))
    second = tf.build(graph, "x86", root / "second", tune_trials=TRIALS, tuning_db=root / "db", progress=False)
    tuning = second.manifest["tuning"]
    assert tuning["trials_spent"] == 0
    assert sorted(tuning["tuned_before"]) == sorted(first.manifest["tuning"]["tasks"])
    assert tuning["tuned_now"] == [] and tuning["untuned"] == []
    assert sorted(tuning["applied"]) == sorted(tuning["tasks"])  # every task compiled from its record
    assert tuning["database_repairs"] == []
    assert _records(root / "db") == records_before  # nothing measured, nothing written
    assert second.manifest["prepacked_weights"] == first.manifest["prepacked_weights"]
    assert tools.relative_error(tools.torch_output(model, x), second.load()(x.numpy())["output0"]) < 1e-4


def test_tune_further_spends_the_budget_on_tuned_tasks_too(tuned, tools):
    root, model, x, first = tuned
    database = root / "further-db"
    shutil.copytree(root / "db", database)  # the other tests keep their database as it was
    lines_before = (database / RECORD_FILE).read_text().splitlines()
    artifact = tf.build(tf.capture(model, (x,)), "x86", root / "further", tune_trials=TRIALS, tuning_db=database,
                        progress=False, tune_further=True)
    tuning = artifact.manifest["tuning"]
    assert tuning["tuned_before"] == first.manifest["tuning"]["tasks"]  # it had records, and was tuned again
    assert 0 < tuning["trials_spent"] <= TRIALS and tuning["tuned_now"] == tuning["tasks"]
    lines_after = (database / RECORD_FILE).read_text().splitlines()
    assert lines_after[:len(lines_before)] == lines_before and len(lines_after) > len(lines_before)  # kept, added
    assert tuning["untuned"] == []
    assert tools.relative_error(tools.torch_output(model, x), artifact.load()(x.numpy())["output0"]) < 1e-4


def test_tuning_works_whatever_handlers_the_host_put_on_metaschedules_logger(tmp_path, tools):
    """pytest 9 attaches unnamed LogCaptureHandlers there; MetaSchedule's create_loggers failed on them."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    unnamed, named = logging.Handler(), logging.StreamHandler(io.StringIO())
    named.set_name("host.handler")
    logger.addHandler(unnamed)
    logger.addHandler(named)
    level, propagate = logger.level, logger.propagate
    try:
        # two builds in one process: the second one configures MetaSchedule's loggers again
        for run in ("a", "b"):
            model, x = _conv_relu(), torch.randn(1, 3, 16, 16)
            artifact = tf.build(tf.capture(model, (x,)), "x86", tmp_path / run, tune_trials=2,
                                tuning_db=tmp_path / f"db-{run}", progress=False)
            assert artifact.manifest["tuning"]["trials_spent"] > 0 and artifact.manifest["tuning"]["untuned"] == []
            assert tools.relative_error(tools.torch_output(model, x), artifact.load()(x.numpy())["output0"]) < 1e-4
            # left as it was found: the host's handlers, none of MetaSchedule's, the same level
            assert logger.handlers == [unnamed, named]
            assert (logger.level, logger.propagate) == (level, propagate)
    finally:
        logger.removeHandler(unnamed)
        logger.removeHandler(named)


def test_untuned_build_still_applies_the_database(tuned):
    root, model, x, first = tuned
    artifact = tf.build(tf.capture(model, (x,)), "x86", root / "zero", tune_trials=0, tuning_db=root / "db",
                        progress=False)
    assert artifact.manifest["tuning"]["trials_spent"] == 0
    assert artifact.manifest["tuning"]["tuned_before"] == first.manifest["tuning"]["tasks"]


def test_a_build_waits_for_another_process_using_the_database_and_says_so(tuned, tmp_path, caplog):
    import subprocess
    import sys
    import textwrap

    root, model, x, first = tuned
    database = tmp_path / "db"
    shutil.copytree(root / "db", database)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from tensorfold.targets.tuning.database import database_lock
        with database_lock(sys.argv[1], "tuning 9 task(s) for x86", print):
            print("held", flush=True)
            time.sleep(3)
    """), str(database)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    with caplog.at_level(logging.WARNING, logger="tensorfold.targets.tuning.tune"):
        artifact = tf.build(tf.capture(model, (x,)), "x86", tmp_path / "waited", tune_trials=0, tuning_db=database,
                            progress=False)
    assert holder.wait(30) == 0
    tuning = artifact.manifest["tuning"]
    assert tuning["lock_wait_seconds"] > 0.5  # it waited (the holder kept the lock ~3 s)
    assert tuning["tuned_before"] == first.manifest["tuning"]["tasks"]  # and then read every record
    assert f"is in use (pid {holder.pid}: tuning 9 task(s) for x86" in caplog.text


def test_damaged_database_keeps_its_good_records_and_is_reused(tuned, tmp_path, tools):
    """What a killed run can leave: a truncated last line; plus a garbage line in the middle."""
    root, model, x, first = tuned
    database = tmp_path / "db"
    shutil.copytree(root / "db", database)
    good = (database / RECORD_FILE).read_text().splitlines()
    assert len(good) >= 2
    damaged = good[:1] + ["{garbage"] + good[1:] + [good[-1][:len(good[-1]) // 2]]
    (database / RECORD_FILE).write_text("\n".join(damaged))  # no final newline: cut off mid-line

    artifact = tf.build(tf.capture(model, (x,)), "x86", tmp_path / "out", tune_trials=TRIALS,
                        tuning_db=database, progress=False)

    tuning = artifact.manifest["tuning"]
    assert (database / RECORD_FILE).read_text().splitlines() == good  # all good lines, no new trial
    assert tuning["trials_spent"] == 0 and tuning["tuned_now"] == [] and tuning["untuned"] == []
    assert sorted(tuning["tuned_before"]) == sorted(tuning["applied"]) == sorted(first.manifest["tuning"]["tasks"])
    assert tuning["database_repairs"] == [f"{RECORD_FILE}: dropped 2 damaged line(s) (line 2, {len(good) + 2}): "
                                          "not the JSON MetaSchedule writes, e.g. cut off by a killed tuning run"]
    assert (database / WORKLOAD_FILE).read_text() == (root / "db" / WORKLOAD_FILE).read_text()
    assert tools.relative_error(tools.torch_output(model, x), artifact.load()(x.numpy())["output0"]) < 1e-4


def test_untuned_build_names_every_task_it_could_not_schedule(tmp_path, capsys, monkeypatch):
    from tensorfold.cli import _print_artifact

    monkeypatch.setenv("COLUMNS", "400")  # rich folds long cells at the terminal's width

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    artifact = tf.build(tf.capture(model, (torch.randn(1, 3, 16, 16),)), "x86", tmp_path / "out", tune_trials=0,
                        tuning_db=tmp_path / "empty", progress=False)
    tuning = artifact.manifest["tuning"]
    assert len(tuning["tasks"]) == 2 and sorted(tuning["untuned"]) == sorted(tuning["tasks"])
    assert tuning["applied"] == [] and all(task["best_us"] is None for task in tuning["task_profile"])
    _print_artifact(artifact)
    printed = " ".join(capsys.readouterr().out.split())
    assert f"2 of 2 tasks ran untuned (slow, unscheduled code): {', '.join(tuning['untuned'])}" in printed


def test_database_of_another_target_is_refused(tuned):
    from tensorfold.targets import get_target

    root, model, x, _ = tuned
    other = "x86:skylake-avx512" if get_target("x86").tvm_target.get("mcpu") != "skylake-avx512" else "x86:znver4"
    with pytest.raises(tf.TensorfoldError, match="belongs to target"):
        tf.build(tf.capture(model, (x,)), other, root / "other", tuning_db=root / "db", progress=False)


def test_default_database_lives_in_the_user_cache(monkeypatch, tmp_path):
    from tensorfold.targets import default_database_dir, get_target

    monkeypatch.delenv("TENSORFOLD_TUNING_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    target = get_target("x86")
    assert default_database_dir(target) == str(tmp_path / ".cache" / "tensorfold" / "tuning" / target.key)


@pytest.mark.slow
def test_new_model_tunes_only_the_workloads_not_in_the_database(tuned):
    root, _, _, first = tuned
    # the first layer is the tuned model's conv (same workload); the second conv is new
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 16, 16)
    artifact = tf.build(tf.capture(model, (x,)), "x86", root / "bigger", tune_trials=TRIALS,
                        tuning_db=root / "db", progress=False)
    tuning = artifact.manifest["tuning"]
    assert set(tuning["tuned_before"]) == set(first.manifest["tuning"]["tasks"])
    assert len(tuning["tuned_now"]) == len(tuning["tasks"]) - len(tuning["tuned_before"]) > 0
    assert 0 < tuning["trials_spent"] <= TRIALS
    json.dumps(artifact.manifest)


def test_structurally_equal_workloads_are_tuned_once_and_both_applied(tmp_path, tools):
    """Two convs of one shape (other weights) are one MetaSchedule task of weight 2: the trials go to it
    once, and its best schedule is applied at both places."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(1, 8, 16, 16)
    artifact = tf.build(tf.capture(model, (x,)), "x86", tmp_path / "out", tune_trials=TRIALS,
                        tuning_db=tmp_path / "db", progress=False)
    tuning = artifact.manifest["tuning"]
    conv_tasks = [t for t in tuning["task_profile"] if "conv2d" in t["name"]]
    assert len(conv_tasks) == 1 and conv_tasks[0]["weight"] == 2, tuning["task_profile"]
    applied_convs = [name for name in tuning["applied"] if "conv2d" in name]
    assert len(applied_convs) >= 1 and tuning["untuned"] == []
    # both places run the tuned schedule: no conv is left unscheduled, and the outputs are right
    error = tools.relative_error(tools.torch_output(model, x), artifact.load()(x.numpy())["output0"])
    assert error < 1e-4
