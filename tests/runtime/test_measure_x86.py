"""tf.measure on this machine: every candidate x engine x target, accuracy from each engine's own outputs."""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch

import tensorfold as tf
from tensorfold.cli import main
from tensorfold.examples import digits
from tensorfold.runtime import openvino_engine
from tensorfold.targets import load_artifact

LIMIT = 120  # digits test images: enough to separate 98% from chance, seconds per engine
# x86's default engines: OpenVINO's two join when the package (the `openvino` extra) is installed
ENGINES = ("torch", "onnxruntime", "tvm") + (("openvino-fp32", "openvino") if openvino_engine.available() else ())


@pytest.fixture(scope="module")
def digits_models():
    model = digits.model(verbose=False)
    wrong = copy.deepcopy(model)
    with torch.no_grad():  # a deliberately wrong candidate: the classifier's rows rolled by one class
        wrong.fc2.weight.copy_(torch.roll(wrong.fc2.weight, 1, dims=0))
        wrong.fc2.bias.copy_(torch.roll(wrong.fc2.bias, 1, dims=0))
    example = (torch.zeros(digits.INPUT_SHAPE),)
    return model, wrong, tf.capture(model, example), tf.capture(wrong, example)


@pytest.fixture(scope="module")
def measured(digits_models, tmp_path_factory):
    _, _, original, wrong = digits_models
    seen = []

    def evaluator(outputs, labels):
        seen.append(outputs.copy())
        return {"errors": int(np.sum(outputs.argmax(1) != labels))}

    out = tmp_path_factory.mktemp("measure")
    report = tf.measure({"original": original, "wrong": wrong}, ["x86"], data="digits", limit=LIMIT, rounds=3,
                        warmup=1, evaluator=evaluator, report=out / "report.json", work_dir=out / "work",
                        progress=False)
    return report, out, seen


def test_report_has_every_candidate_engine_target(measured):
    report, out, _ = measured
    cells = {(r["candidate"], r["engine"], r["target"]) for r in report.rows}
    assert cells == {(c, e, "x86") for c in ("original", "wrong") for e in ENGINES}
    for row in report.rows:
        assert row["status"] == "ok", row
        assert row["latency"]["rounds"] == 3 and row["latency"]["median_ms"] > 0
        assert row["threads"] == report.settings["threads"]
    saved = json.loads((out / "report.json").read_text())
    assert len(saved["rows"]) == 2 * len(ENGINES) and saved["settings"]["threads"] >= 1
    from tensorfold.targets.registry import host_cpu

    assert saved["settings"]["machine"] == host_cpu()  # what the plots' footers name
    for name in ("report_latency.png", "report_accuracy.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    # the fastest engine per candidate x target is a report figure, computed from the rows
    assert len(saved["best_engine"]) == 2
    for best in saved["best_engine"]:
        medians = {r["engine"]: r["latency"]["median_ms"] for r in report.rows if r["candidate"] == best["candidate"]}
        assert best["engine"] == min(medians, key=medians.get) and best["median_ms"] == medians[best["engine"]]
        assert set(best["others_vs_best"]) == set(medians) - {best["engine"]}
        assert all(ratio >= 1.0 for ratio in best["others_vs_best"].values())


def test_accuracy_is_recomputed_from_each_engine(measured, digits_models):
    report, out, seen = measured
    model, wrong, _, _ = digits_models
    images, labels = digits.test_data()
    images, labels = images[:LIMIT], labels[:LIMIT]
    for name, module in (("original", model), ("wrong", wrong)):
        with torch.no_grad():
            expected = float(np.mean(module(torch.from_numpy(images)).argmax(1).numpy() == labels))
        for engine in [e for e in ENGINES if e != "openvino"]:  # bf16 where the CPU has it: may differ by more
            row = report.row(name, engine, "x86")
            assert row["accuracy"]["top1"] == pytest.approx(expected, abs=1.0 / LIMIT), (name, engine)
            assert row["evaluator"]["errors"] == round((1 - row["accuracy"]["top1"]) * LIMIT)
    assert report.row("original", "tvm", "x86")["accuracy"]["top1"] > 0.9
    assert report.row("wrong", "tvm", "x86")["accuracy"]["top1"] < 0.3
    assert report.row("wrong", "tvm", "x86")["fidelity"]["top1_agreement"] < 0.3
    assert report.row("original", "tvm", "x86")["fidelity"]["max_rel_error"] < 1e-4
    assert len(seen) == 2 * len(ENGINES)


def test_tvm_outputs_come_from_the_artifact(measured):
    report, out, _ = measured
    images, _ = digits.test_data()
    artifact_dir = os.path.join(out, "work", "wrong")
    [key] = os.listdir(artifact_dir)
    loaded = load_artifact(os.path.join(artifact_dir, key))
    logits = np.concatenate([next(iter(loaded(images[i:i + 1]).values())) for i in range(LIMIT)])
    _, labels = digits.test_data()
    assert report.row("wrong", "tvm", "x86")["accuracy"]["top1"] == pytest.approx(
        float(np.mean(logits.argmax(1) == labels[:LIMIT])))


def test_onnx_graph_has_no_torch_engine(tmp_path, tools):
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5))
    path = tools.export_to_onnx(net, torch.randn(1, 1, 8, 8))
    report = tf.measure(path, "x86", rounds=2, warmup=1, work_dir=tmp_path / "w", progress=False)
    assert report.row("original", "torch", "x86")["status"] == "not available"
    assert "ONNX" in report.row("original", "torch", "x86")["reason"]
    for engine in ("onnxruntime", "tvm"):
        row = report.row("original", engine, "x86")
        assert row["status"] == "ok" and row["fidelity"]["max_rel_error"] < 1e-4


def test_cli_measure_with_passes(tmp_path, capsys):
    report_path = tmp_path / "r" / "report.json"
    code = main(["measure", "digits", "--target", "x86", "-p", "fold_bn", "--rounds", "2", "--warmup", "1",
                 "--limit", "40", "--work-dir", str(tmp_path / "w"), "--report", str(report_path), "-q"])
    assert code == 0
    saved = json.loads(report_path.read_text())
    assert {r["candidate"] for r in saved["rows"]} == {"original", "original + fold_bn"}
    assert all(r["accuracy"]["top1"] > 0.9 for r in saved["rows"])
    printed = capsys.readouterr().out
    assert "threads" in printed and "fastest for original on x86:" in printed


def test_a_regression_task_keeps_its_float_targets_and_is_scored_by_its_evaluator(tmp_path):
    # float targets (a coordinate MLP's grey values in [0, 1]) given as arrays: they were once cast to
    # int64, so every engine scored its outputs against zeros
    from torch import nn

    from tensorfold.runtime.tasks.evaluators import image_psnr

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1)).eval()
    x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    with torch.no_grad():
        y = (model(torch.from_numpy(x)).numpy() + 0.05 * np.random.default_rng(1).standard_normal((64, 1))).clip(0, 1)
    expected = image_psnr(model(torch.from_numpy(x)).detach().numpy(), y)["psnr"]
    report = tf.measure({"mlp": tf.capture(model, (torch.zeros(8, 16),))}, "x86", data=(x, y.astype(np.float32)),
                        evaluator=image_psnr, engines=["torch", "onnxruntime"], rounds=2, warmup=1,
                        work_dir=tmp_path, progress=False)
    for row in report.rows:
        assert "accuracy" not in row  # no top-1 of grey values
        assert row["evaluator"]["psnr"] == pytest.approx(expected, abs=1e-3), row["engine"]
