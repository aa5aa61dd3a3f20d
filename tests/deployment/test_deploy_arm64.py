"""`tf.deploy` on arm64 under qemu, end to end: a loopback tracker (the `tracker` fixture), an aarch64 TVM
RPC server under qemu-aarch64, the digits task with one rate per layer, untuned TVM and 48 test images.

Checked here, independently of the deploy's own report where it can be: the latency table and every
end-to-end figure are marked emulated and the verdict is not "met" on them; the artifact is an aarch64
ELF; the deployed library's outputs on the device equal OUT/model.onnx run by onnxruntime on x86. The
deploy decides int8 on emulated times, so a second deploy repeats its recipe with int8 off: that
artifact (fp32) must match to float tolerance, the first to int8 tolerance when int8 was kept.
"""
from __future__ import annotations

import json
import struct

import numpy as np
import onnxruntime as ort
import pytest

import tensorfold as tf
from tensorfold.runtime.tasks import get_task
from tensorfold.runtime.tvm_engine import prepare_remote
from tensorfold.targets import qemu, rpc

MISSING = qemu.missing_runtime()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"arm64 under qemu unavailable: {MISSING}")

KEY = "arm64-deploy"
EM_AARCH64 = 183
SAMPLES = 48


def _data() -> tuple[np.ndarray, np.ndarray]:
    images, labels = get_task("digits").test_data()
    return np.asarray(images[:SAMPLES], np.float32), np.asarray(labels[:SAMPLES])


@pytest.fixture(scope="module")
def deployed(tracker, tmp_path_factory):
    """The deploy on arm64 (private latency cache), its recipe again with int8 off, and both artifacts'
    outputs on the device; the server is stopped after."""
    host, port = tracker
    root = tmp_path_factory.mktemp("arm64")
    options = dict(speedup=1.2, max_drop=100, rounds=2, data=_data(), rpc_tracker=f"{host}:{port}", rpc_key=KEY,
                   progress=False)
    with pytest.MonkeyPatch.context() as mp, qemu.start_arm64_server(host, port, KEY):
        mp.setenv("TENSORFOLD_LATENCY_DIR", str(root / "latency-cache"))
        # max_drop=100: accuracy cannot fail the verdict, so only the emulated times keep it from "met"
        first = tf.deploy("digits", "arm64", root / "out", rates=(2,), **options)
        recipe = (root / "out" / "recipe.toml").read_text()
        (root / "fp32.toml").write_text(recipe.replace("int8 = true", "int8 = false"))
        fp32 = tf.deploy("digits", "arm64", root / "fp32", recipe=str(root / "fp32.toml"), **options)
        remote = rpc.request_session(host, port, KEY, timeout=60)  # after the deploys: the server re-registers
        outputs = {name: _device_outputs(root / name / "artifact", remote) for name in ("out", "fp32")}
        remote.session = None
    yield {"out": first, "fp32": fp32}, root, outputs


def _device_outputs(artifact, remote) -> np.ndarray:
    """The artifact's library loaded on the arm64 server (a session through the tracker), run image by image."""
    images, _ = _data()
    runner = prepare_remote(str(artifact), remote)
    try:
        return np.concatenate([next(iter(runner({runner.input_names[0]: images[i:i + 1]}).values()))
                               for i in range(len(images))])
    finally:
        runner.close()


def _x86_outputs(model) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    images, _ = _data()
    return np.concatenate([session.run(None, {name: images[i:i + 1]})[0] for i in range(len(images))])


def _relative_error(reference: np.ndarray, value: np.ndarray) -> float:
    reference = reference.astype(np.float64)
    return float(np.linalg.norm(reference - value) / np.linalg.norm(reference))


def test_the_deploy_finishes_and_writes_its_outputs(deployed):
    results, root, _ = deployed
    for name in ("report.json", "report.md", "recipe.toml", "model.onnx", "artifact/manifest.json"):
        assert (root / "out" / name).is_file(), name
    assert json.loads((root / "out" / "report.json").read_text())["target"] == "arm64"
    assert "emulated under qemu" in (root / "out" / "report.md").read_text()
    assert results["fp32"].report["int8"]["int8"] is False and results["fp32"].report["latency_table"] is None


def test_every_time_is_marked_emulated_and_the_verdict_is_never_met(deployed):
    results, _, _ = deployed
    report = results["out"].report
    table = report["latency_table"]
    assert table["emulated"] is True and table["original_ms"]["emulated"] is True
    entries = [c for layer in table["layers"] for c in layer["candidates"]]
    assert len(entries) >= 2 * len(table["layers"]) > 0 and all(c["emulated"] is True for c in entries)
    assert table["cache"]["path"].endswith("-emulated.json")  # never mixed with a real device's times
    assert all(w["emulated"] is True for w in report["measure"]["warm"].values())
    if "fp32_ms" in report["int8"]:
        assert report["int8"]["emulated"] is True
    for result in results.values():
        rows = result.report["measure"]["rows"]
        assert {r["candidate"] for r in rows} == {"original", "deployed"}
        assert all(r["emulated"] is True and r["latency"]["median_ms"] > 0 for r in rows)
        verdict = result.report["verdict"]
        assert verdict["emulated"] is True and verdict["met"] is False and result.met is False
        assert verdict["accuracy_met"] is True  # max_drop=100: the emulated times alone refuse "met"
        assert "emulated" in verdict["summary"] and "never met" in verdict["summary"]
        # accuracy before and after, reported from the device's own outputs
        assert verdict["top1_before"] > 0.9 and 0 <= verdict["top1_after"] <= 1


def test_the_artifact_is_an_aarch64_build(deployed):
    _, root, _ = deployed
    for name in ("out", "fp32"):
        header = (root / name / "artifact" / "model.so").read_bytes()[:20]
        assert header[:4] == b"\x7fELF" and header[4] == 2  # 64-bit
        assert struct.unpack("<H", header[18:20])[0] == EM_AARCH64
        manifest = json.loads((root / name / "artifact" / "manifest.json").read_text())
        assert manifest["target"]["name"] == "arm64" and manifest["target"]["tvm"]["mtriple"].startswith("aarch64")


def test_the_fp32_device_outputs_match_the_model_on_x86_to_float_tolerance(deployed):
    _, root, device = deployed
    host = _x86_outputs(root / "fp32" / "model.onnx")
    assert device["fp32"].shape == host.shape == (SAMPLES, 10)
    error = _relative_error(host, device["fp32"])
    print(f"fp32 on arm64 vs onnxruntime on x86: relative error {error:.3g}")
    assert error < 1e-5
    assert np.array_equal(device["fp32"].argmax(1), host.argmax(1))


def test_the_deployed_device_outputs_match_the_model_on_x86(deployed):
    results, root, device = deployed
    host = _x86_outputs(root / "out" / "model.onnx")
    error = _relative_error(host, device["out"])
    int8 = results["out"].report["int8"]["int8"]
    print(f"deployed ({'int8' if int8 else 'fp32'}) on arm64 vs onnxruntime on x86: relative error {error:.3g}, "
          f"top-1 agreement {np.mean(device['out'].argmax(1) == host.argmax(1)):.3f}")
    # int8: TVM's fixed-point requantization and onnxruntime's rounding may differ by a step here and there
    assert error < (2e-2 if int8 else 1e-5)
    assert np.mean(device["out"].argmax(1) == host.argmax(1)) >= (0.95 if int8 else 1.0)
