"""arm64 under qemu over TVM RPC through a tracker on loopback; unreachable trackers; a server dying mid-measure.

Every tracker and server here listens on 127.0.0.1, runs in its own process group and is
stopped in the fixture's teardown.
"""
from __future__ import annotations

import copy
import importlib
import time

import numpy as np
import pytest
import torch

import tensorfold as tf
from tensorfold.examples import digits
from tensorfold.measure import MeasureError
from tensorfold.runtime import tvm_engine
from tensorfold.targets import get_target, qemu, rpc

MISSING = qemu.missing_runtime()
needs_qemu = pytest.mark.skipif(MISSING is not None, reason=f"arm64 under qemu unavailable: {MISSING}")


@pytest.fixture(scope="module")
def graphs():
    model = digits.model(verbose=False)
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong.fc2.weight.mul_(-1.0)
    example = (torch.zeros(digits.INPUT_SHAPE),)
    return {"original": tf.capture(model, example), "wrong": tf.capture(wrong, example)}


def test_unreachable_tracker_is_named_within_the_timeout(graphs, tmp_path):
    port = rpc.free_port()  # nothing listens there
    importlib.import_module("tvm.rpc")  # the first TVM import (seconds, 19 s under CI load) is not what is timed
    started = time.monotonic()
    with pytest.raises(MeasureError, match=f"arm64.*127.0.0.1:{port}.*unreachable"):
        tf.measure(graphs["original"], "arm64", rpc_tracker=f"127.0.0.1:{port}", rpc_timeout=2.0, rounds=1,
                   warmup=0, work_dir=tmp_path, progress=False)
    assert time.monotonic() - started < 10
    started = time.monotonic()  # a blackholed address: the connect itself must time out
    with pytest.raises(rpc.RpcError, match="10.255.255.1:9190"):
        rpc.connect_tracker("10.255.255.1", 9190, timeout=2.0)
    assert time.monotonic() - started < 5


@needs_qemu
def test_arm64_under_qemu_matches_x86(tracker, graphs, tmp_path):
    host, port = tracker
    key = "arm64-test"
    with qemu.start_arm64_server(host, port, key):
        report = tf.measure(graphs["original"], ["x86", "arm64"], data="digits", limit=24, rounds=2, warmup=1,
                            rpc_tracker=f"{host}:{port}", rpc_key=key, work_dir=tmp_path, progress=False)
    x86, arm = report.row("original", "tvm", "x86"), report.row("original", "tvm-rpc", "arm64")
    assert arm["status"] == "ok" and arm["emulated"] is True and not x86.get("emulated")
    assert arm["fidelity"]["max_rel_error"] < 1e-4 and arm["fidelity"]["top1_agreement"] == 1.0
    assert arm["accuracy"]["top1"] == x86["accuracy"]["top1"] > 0.9
    # and directly: arm64 outputs against x86 TVM outputs, both from the measure's own runs
    assert abs(arm["accuracy"]["top1"] - x86["accuracy"]["top1"]) == 0


@needs_qemu
def test_server_killed_mid_measure_names_the_target_and_keeps_the_rest(tracker, graphs, tmp_path):
    host, port = tracker
    key = "arm64-doomed"
    server = qemu.start_arm64_server(host, port, key)
    calls = {"n": 0}

    def killer(outputs, labels):
        calls["n"] += 1
        if calls["n"] == 7:  # x86 ran 2 candidates x 3 engines; this is arm64's first candidate: kill the server now
            server.stop(grace=0.5)
        return {}

    try:
        with pytest.raises(MeasureError) as caught:
            tf.measure(graphs, ["x86", "arm64"], data="digits", limit=8, rounds=2, warmup=1, evaluator=killer,
                       rpc_tracker=f"{host}:{port}", rpc_key=key, rpc_timeout=3.0, work_dir=tmp_path,
                       report=tmp_path / "report.json", progress=False,
                       engines=["torch", "onnxruntime", "tvm", "tvm-rpc"])  # 3 on x86 whether OpenVINO is installed
    finally:
        server.stop()
    message = str(caught.value)
    assert "arm64" in message and "outputs of original/tvm-rpc" in message
    report = caught.value.report
    assert [e["target"] for e in report.errors] == ["arm64"]
    for name in graphs:
        for engine in ("torch", "onnxruntime", "tvm"):
            row = report.row(name, engine, "x86")
            assert row["status"] == "ok" and row["latency"]["rounds"] == 2
    assert report.row("original", "tvm-rpc", "arm64")["accuracy"]["top1"] > 0.9  # completed before the kill
    assert report.row("wrong", "tvm-rpc", "arm64")["status"] == "failed"
    assert (tmp_path / "report.json").exists()


@needs_qemu
def test_arm64_tunes_on_the_device_through_the_tracker(tracker, tmp_path):
    """MetaSchedule's RPC runner: candidates cross-compiled here into .so files, timed on the device."""
    host, port = tracker
    key = "arm64-tune"
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU()).eval()
    x = torch.randn(1, 3, 16, 16)
    target = rpc.placed(get_target("arm64"), f"{host}:{port}", key)
    with qemu.start_arm64_server(host, port, key):
        artifact = tf.build(tf.capture(model, (x,)), target, tmp_path / "arm64", tune_trials=2,
                            tuning_db=tmp_path / "db", progress=False)
        tuning = artifact.manifest["tuning"]
        assert 0 < tuning["trials_spent"] <= 2
        assert tuning["tuned_now"] == tuning["tasks"] and tuning["untuned"] == []
        assert all(task["best_us"] and task["best_us"] > 0 for task in tuning["task_profile"])  # timed there
        runner = tvm_engine.prepare_remote(str(artifact.path), rpc.request_session(host, port, key))
        out = runner({artifact.manifest["inputs"][0]["name"]: x.numpy()})
    expected = model(x).detach().numpy()
    got = next(iter(out.values()))
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-4


def test_tuning_a_remote_target_needs_a_registered_device(tracker, tmp_path):
    host, port = tracker
    target = rpc.placed(get_target("arm64"), f"{host}:{port}", "nobody-here")
    graph = tf.capture(torch.nn.Conv2d(3, 4, 3).eval(), (torch.randn(1, 3, 8, 8),))
    with pytest.raises(tf.TensorfoldError, match="no device registered under key 'nobody-here'"):
        tf.build(graph, target, tmp_path / "a", tune_trials=2, tuning_db=tmp_path / "db", progress=False)
