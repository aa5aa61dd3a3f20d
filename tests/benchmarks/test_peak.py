"""benchmarks/peak.py's per-precision peak: the int8 GEMM it times is the float one, quantized (so its rate
is a matmul's rate), and OpenVINO reports every precision the CPU offers."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _peak():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("peak_under_test", BENCHMARKS / "peak.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.parametrize("int8", [False, True])
def test_timed_matmul_graphs_compute_the_matmul(int8):
    peak = _peak()
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((64, 32)).astype(np.float32)
    x = rng.uniform(-3, 3, (8, 64)).astype(np.float32)  # inside the int8 graph's fixed input range
    session = ort.InferenceSession(peak._matmul_onnx(weight, int8=int8), providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": x})[0]
    exact = x @ weight
    error = np.abs(y - exact).max() / np.abs(exact).max()
    assert error < (0.03 if int8 else 1e-5), error


def test_openvino_reports_each_precision_it_offers():
    pytest.importorskip("openvino", reason='the openvino extra: pip install -e ".[openvino]"')
    import openvino as ov

    rates = _peak().openvino_matmul_gops(threads=1, m=16, k=64, n=64, repeats=1)
    offered = [str(p) for p in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
    assert set(rates) == {"fp32", "int8"} | ({"bf16"} if "BF16" in offered else set())
    assert all(rate > 0 for rate in rates.values())
