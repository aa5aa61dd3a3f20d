"""OpenVINO as a measured engine: its outputs against onnxruntime's (fp32 and tensorfold's int8 QDQ graph),
the message when the package is missing, and its rows in tf.measure."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from onnx import numpy_helper

import tensorfold as tf
from tensorfold.cli import main
from tensorfold.ir.errors import TensorfoldError
from tensorfold.runtime import openvino_engine
from tensorfold.targets import get_target

CALIBRATION = 64


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10)).eval()


@pytest.fixture(scope="module")
def graphs():
    """A small conv net captured in fp32, and tensorfold's int8 (QDQ) graph of it calibrated on random images."""
    torch.manual_seed(0)
    graph = tf.capture(_net(), torch.zeros(1, 3, 16, 16))
    calibration = np.random.default_rng(1).standard_normal((CALIBRATION, 3, 16, 16)).astype(np.float32)
    quantized, _ = tf.compress(graph, "int8", calibration=[calibration[i:i + 16] for i in range(0, CALIBRATION, 16)],
                               progress=False)
    return graph, quantized


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(2).standard_normal((16, 3, 16, 16)).astype(np.float32)


def _outputs(graph, images: np.ndarray, engine: str) -> tuple[np.ndarray, dict]:
    """Every image through a fresh onnxruntime session (not tensorfold's runner) or tensorfold's OpenVINO runner."""
    name = graph.inputs[0].name
    if engine == "onnxruntime-direct":
        import onnxruntime as ort

        session = ort.InferenceSession(graph.to_onnx().SerializeToString(), providers=["CPUExecutionProvider"])
        return np.concatenate([session.run(None, {name: images[i:i + 1]})[0] for i in range(len(images))]), {}
    runner = openvino_engine.prepare(graph, 2, engine)
    assert runner.engine == engine and runner.threads == 2 and runner.input_names == [name]
    return np.concatenate([runner({name: images[i:i + 1]})[graph.output_names[0]] for i in range(len(images))]), \
        runner.details


def _cpu_has(flag: str) -> bool:
    with open("/proc/cpuinfo") as f:
        return any(flag in line.split() for line in f if line.startswith("flags"))


def test_fp32_outputs_match_onnxruntime(graphs, images):
    pytest.importorskip("openvino")
    graph, _ = graphs
    reference, _ = _outputs(graph, images, "onnxruntime-direct")
    scale = np.abs(reference).max()
    fp32, details = _outputs(graph, images, "openvino-fp32")
    assert details["precision"] == "f32" and details["int8_layers"] == 0 and details["compute_layers"] == 3
    assert np.abs(fp32 - reference).max() <= 1e-5 * scale
    default, details = _outputs(graph, images, "openvino")
    # OpenVINO's own default: bf16 on CPUs with AVX512_BF16 (or AMX), f32 elsewhere (the README says which)
    if _cpu_has("avx512_bf16") or _cpu_has("amx_bf16"):
        assert details["precision"] == "bf16"
    assert details["precision"] in ("f32", "bf16")
    tolerance = 1e-5 if details["precision"] == "f32" else 3e-2  # bf16 keeps 8 significant bits
    assert np.abs(default - reference).max() <= tolerance * scale
    assert np.array_equal(default.argmax(1), reference.argmax(1))


def test_int8_qdq_graph_runs_in_int8_and_matches_onnxruntime(graphs, images):
    """Both run tensorfold's QDQ graph in integer arithmetic; the output is dequantized from uint8 with the
    last QuantizeLinear's scale, one "step". OpenVINO f32 matches onnxruntime to within one step (here
    bit-exact); its bf16 default keeps the non-quantized ops (pooling, bias adds) in bf16, so a requantized
    value may land one step away: at most 2 steps. One step here is ~0.7 % of the largest |output|."""
    pytest.importorskip("openvino")
    _, quantized = graphs
    model = quantized.to_onnx()
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 3 and "Conv" in ops
    producers = {n.output[0]: n for n in model.graph.node}
    last = producers[model.graph.output[0].name]
    assert last.op_type == "DequantizeLinear"
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    step = float(initializers[last.input[1]])
    reference, _ = _outputs(quantized, images, "onnxruntime-direct")
    assert step < 0.02 * np.abs(reference).max()  # the tolerance below is tight against the output's range
    for engine, steps in (("openvino-fp32", 1), ("openvino", 2)):
        values, details = _outputs(quantized, images, engine)
        # every conv and the linear layer run in int8 (u8 activations x s8 weights), not emulated in float
        assert details["compute_layers"] == 3 and details["int8_layers"] == 3, (engine, details)
        difference = np.abs(values - reference) / step
        assert difference.max() <= steps + 1e-3, (engine, difference.max())
        assert np.mean(difference > 0.5) < 0.25, engine  # most outputs are the same integer


def test_missing_openvino_names_the_extra(monkeypatch, graphs, tmp_path, capsys, tools):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    graph, _ = graphs
    assert not openvino_engine.available()
    for engine in openvino_engine.ENGINES:
        with pytest.raises(TensorfoldError, match=r'pip install -e "\.\[openvino\]"'):
            openvino_engine.prepare(graph, 2, engine)
    # not installed: the default engine set on x86 leaves OpenVINO out, and naming it fails before any build
    from tensorfold.measure import _engines

    assert _engines(get_target("x86")) == ["torch", "onnxruntime", "tvm"]
    with pytest.raises(TensorfoldError, match=r"\.\[openvino\]"):
        tf.measure(graph, "x86", engines=["onnxruntime", "openvino"], work_dir=tmp_path / "w", progress=False)
    assert not (tmp_path / "w").exists()
    path = tools.export_to_onnx(_net(), torch.zeros(1, 3, 16, 16))
    code = main(["measure", path, "--target", "x86", "--engines", "openvino-fp32", "-q"])
    error = capsys.readouterr().err
    assert code == 2 and 'pip install -e ".[openvino]"' in error and "Traceback" not in error


def test_default_engines_and_names():
    from tensorfold.measure import _engines

    x86 = _engines(get_target("x86"))
    assert x86[:3] == ["torch", "onnxruntime", "tvm"]
    assert ("openvino" in x86 and "openvino-fp32" in x86) == openvino_engine.available()
    assert _engines(get_target("arm64")) == ["tvm-rpc"]
    assert _engines(get_target("x86"), ["openvino", "tvm-rpc", "onnxruntime"]) == ["onnxruntime", "openvino"]
    with pytest.raises(TensorfoldError, match="known: torch, onnxruntime"):
        tf.measure("unused.onnx", "x86", engines=["openvin"])


def test_measure_reports_openvino_rows(graphs, tmp_path):
    pytest.importorskip("openvino")
    graph, quantized = graphs
    report = tf.measure({"original": graph, "int8": quantized}, "x86", engines=["onnxruntime", "openvino-fp32",
                                                                                "openvino"],
                        rounds=3, warmup=1, work_dir=tmp_path / "w", report=tmp_path / "report.json", progress=False)
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())  # no TVM engine: nothing built
    assert report.settings["engines"] == {"x86": ["onnxruntime", "openvino-fp32", "openvino"]}
    for candidate in ("original", "int8"):
        for engine in ("openvino-fp32", "openvino"):
            row = report.row(candidate, engine, "x86")
            assert row["status"] == "ok" and row["threads"] == report.settings["threads"], row
            assert row["latency"]["rounds"] == 3 and row["latency"]["median_ms"] > 0
            assert row["precision"] == ("f32" if engine == "openvino-fp32" else row["precision"])
            assert row["int8_layers"] == (3 if candidate == "int8" else 0)
        assert report.row(candidate, "openvino-fp32", "x86")["fidelity"]["max_rel_error"] < (
            1e-4 if candidate == "original" else 0.1)
    best = {b["candidate"]: b for b in report.to_json()["best_engine"]}
    assert set(best) == {"original", "int8"}
    for b in best.values():
        assert {b["engine"], *b["others_vs_best"]} == {"onnxruntime", "openvino-fp32", "openvino"}
    table = report.table()
    assert table.row_count == 6
