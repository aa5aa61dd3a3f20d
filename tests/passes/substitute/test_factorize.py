"""Factorization passes on real graphs (FX and ONNX): exactness at full rank, true reports, bad options."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import tensorfold as tf
from tensorfold.ir.errors import PipelineError
from tensorfold.passes.ranks import policy as rp
from tensorfold.passes.measure import relative_error

warnings.filterwarnings("ignore", category=DeprecationWarning)


def _export(model: nn.Module, x: torch.Tensor, path) -> str:
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return str(path)


def _graph(front: str, model: nn.Module, x: torch.Tensor, tmp_path):
    model = model.eval()
    return tf.capture(model, x) if front == "fx" else tf.load(_export(model, x, tmp_path / "m.onnx"))


def _outputs(graph, x: np.ndarray) -> np.ndarray:
    return graph.run({graph.inputs[0].name: x})[graph.output_names[0]]


# (method pipeline template, model factory, input shape); {r} is replaced by the layer's full rank
ZOO = {
    "svd-linear": ("svd", lambda: nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 12, bias=False)), (3, 24)),
    "svd-1x1-stride": ("svd", lambda: nn.Sequential(nn.Conv2d(8, 12, 1, stride=2), nn.ReLU(), nn.Conv2d(12, 6, 1)), (1, 8, 9, 9)),
    "svd-conv1d": ("svd", lambda: nn.Sequential(nn.Conv1d(8, 12, 1, bias=False)), (2, 8, 10)),
    "spatial_svd": ("spatial_svd", lambda: nn.Sequential(nn.Conv2d(6, 10, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2))), (1, 6, 12, 13)),
    "spatial_svd-asym": ("spatial_svd", lambda: nn.Sequential(nn.ZeroPad2d((0, 1, 1, 0)), nn.Conv2d(6, 10, 3, bias=False)), (1, 6, 8, 8)),
    "tucker2": ("tucker2", lambda: nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1, dilation=1)), (1, 8, 11, 11)),
    "tucker2-dilated-grouped": ("tucker2", lambda: nn.Sequential(nn.Conv2d(8, 12, 3, padding=2, dilation=2, groups=2)), (1, 8, 10, 10)),
    "tucker2-conv1d": ("tucker2", lambda: nn.Sequential(nn.Conv1d(6, 10, 3, padding=1)), (2, 6, 12)),
    "cp3": ("cp(variant=cp3, n_iter_max=2000)", lambda: nn.Sequential(nn.Conv2d(4, 5, 3, padding=1, stride=2)), (1, 4, 9, 9)),
    "cp4": ("cp(variant=cp4, n_iter_max=2000)", lambda: nn.Sequential(nn.Conv2d(3, 4, (3, 2), padding=(1, 0))), (1, 3, 8, 8)),
    "tt": ("tt", lambda: nn.Sequential(nn.Linear(24, 36), nn.ReLU(), nn.Linear(36, 8)), (4, 24)),
}


def _full_rank_pipeline(template: str, graph) -> str:
    name = template.split("(")[0]
    key = {"cp": None}.get(name, name)
    layer = next(l for l in graph.layers() if l.spec is not None and l.kind in ("conv", "linear")
                 and rp.METHODS[key or ("cp4" if "cp4" in template else "cp3")].check(l.spec) is None)
    key = key or ("cp4" if "cp4" in template else "cp3")
    if key.startswith("cp"):
        from tensorfold.passes import decompose as dec
        ranks = (dec.exact_cp_rank(dec.cp_kernel_shape(layer.spec, key)),)
    else:
        ranks = rp.max_ranks(key, layer.spec)
    options = f"rank=({','.join(map(str, ranks))}), force=true"
    return f"{template[:-1]}, {options})" if template.endswith(")") else f"{template}({options})"


@pytest.mark.parametrize("front", ["fx", "onnx"])
@pytest.mark.parametrize("case", sorted(ZOO))
def test_full_rank_is_exact(case, front, tmp_path):
    template, factory, shape = ZOO[case]
    torch.manual_seed(0)
    x = torch.randn(*shape)
    graph = _graph(front, factory(), x, tmp_path)
    pipeline = _full_rank_pipeline(template, graph)
    result, report = tf.compress(graph, pipeline)
    replaced = report.passes[0].changed
    assert replaced, f"{pipeline}: nothing replaced; records {report.passes[0].records}"
    probe = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    error = relative_error(_outputs(graph, probe), _outputs(result, probe))
    print(f"FULLRANK {case} {front} {error:.1e}")
    assert error < 1e-4, f"{case} on {front}: relative error {error}"
    for record in replaced:
        assert record.details["weight_error"] < 1e-4
        assert record.details["factor_layers"] >= 2
    if front == "onnx":
        onnx.checker.check_model(result.to_onnx())


def test_onnx_result_runs_in_onnxruntime_and_keeps_standard_ops(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 36, 64), nn.ReLU(),
                          nn.Linear(64, 10)).eval()
    x = torch.randn(1, 8, 6, 6)
    graph = _graph("onnx", model, x, tmp_path)
    result, _ = tf.compress(graph, "cp(rank=6), tt(rank=4, force=true), svd(rank=4, include=/5/*)")
    out = tmp_path / "factored.onnx"
    result.save(out)
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert {"Conv", "Einsum"} <= ops and ops <= {"Conv", "Relu", "Flatten", "Gemm", "MatMul", "Add", "Einsum",
                                                 "Reshape", "Shape", "Slice", "Concat"}
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    probe = np.random.default_rng(0).standard_normal((3, 8, 6, 6)).astype(np.float32)
    assert np.allclose(session.run(None, {"input": probe})[0], _outputs(result, probe), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("front", ["fx", "onnx"])
def test_reported_errors_are_true(front, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 24, 3, padding=1))
    x = torch.randn(1, 8, 10, 10)
    graph = _graph(front, model, x, tmp_path)
    calibration = [np.random.default_rng(5).standard_normal((2, 8, 10, 10)).astype(np.float32)]
    result, report = tf.compress(graph, "tucker2(rank=(6,4))", calibration=calibration)
    # whole-model error on the calibration inputs, recomputed here
    feed = calibration[0]
    measured = relative_error(_outputs(graph, feed), _outputs(result, feed))
    assert report.output_error_calibration == pytest.approx(measured, rel=1e-3)
    assert measured > 1e-3  # lossy: there is an error to report
    # per-layer error of the first conv: its input is the graph input itself
    first = report.passes[0].records[0]
    assert first.action == "replaced"
    original_layer = graph.layers()[0]
    from tensorfold.ir.torch_modules import run_specs
    new_layer_specs = [l.spec for l in result.layers()[:3]]
    expected = relative_error(run_specs([original_layer.spec], feed), run_specs(new_layer_specs, feed))
    assert first.error_calibration == pytest.approx(expected, rel=1e-3)
    # weight error recomputed from the factor kernels
    from tensorfold.passes.equivalent import dense_weight
    dense = dense_weight(new_layer_specs)
    want = np.linalg.norm(dense - original_layer.spec.weight) / np.linalg.norm(original_layer.spec.weight)
    assert first.details["weight_error"] == pytest.approx(want, rel=1e-4)
    # totals agree with the graphs
    assert report.params_after == result.total_params()
    assert report.flops_after == result.layer_cost().flops < report.flops_before


def _plant_low_rank(model: nn.Module) -> None:
    """Give every 3x3 conv a Tucker-2 structure (ranks T/4, S/4) under 1% noise, as trained
    weights have and random ones lack, so that EVBMF has a rank to find."""
    rng = np.random.default_rng(0)
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3) and module.in_channels >= 64:
            t, s = module.out_channels, module.in_channels
            core = rng.standard_normal((t // 4, s // 4, 3, 3))
            kernel = np.einsum("ab,bcij,dc->adij", rng.standard_normal((t, t // 4)), core, rng.standard_normal((s, s // 4)))
            kernel += 0.01 * kernel.std() * rng.standard_normal(kernel.shape)
            kernel *= module.weight.detach().numpy().std() / kernel.std()
            module.weight.data = torch.from_numpy(kernel.astype(np.float32))


def test_whole_resnet18_pipeline_exports_to_onnx(tmp_path):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    _plant_low_rank(model)
    x = torch.randn(1, 3, 64, 64)
    graph = tf.capture(model, x)
    result, report = tf.compress(graph, "fold_bn, tucker2(rank=evbmf), svd(energy=0.95)")
    tucker = report.passes[1]
    assert len(tucker.changed) >= 15, "EVBMF should find the planted ranks of the 3x3 convs"
    for record in tucker.changed:  # the planted ranks (T/4, S/4) are found, give or take the noise
        t, s = graph.layer(record.layer).spec.weight.shape[:2]
        assert abs(record.details["ranks"][0] - t // 4) <= 2 and abs(record.details["ranks"][1] - s // 4) <= 2
    out = tmp_path / "r18.onnx"
    result.save(out)
    onnx.checker.check_model(onnx.load(out))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    probe = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        want = result.to_torch()(torch.from_numpy(probe)).numpy()
    got = session.run(None, {session.get_inputs()[0].name: probe})[0]
    assert relative_error(want, got) < 1e-4
    assert report.params_after < report.params_before and report.flops_after < report.flops_before


@pytest.mark.parametrize("pipeline, message", [
    ("svd(rank=0)", "rank"),
    ("svd(energy=1.5)", "energy"),
    ("svd(energy=0)", "energy"),
    ("svd(rank=4, energy=0.9)", "one rank policy"),
    ("tucker2(budget=params:0.0001)", "smallest reachable"),
    ("tucker2(budget=bytes:0.5)", "budget"),
    ("cp(method=magic)", "method"),
])
def test_bad_options_are_errors(pipeline, message, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 36, 32))
    graph = _graph("fx", model, torch.randn(1, 8, 6, 6), tmp_path)
    with pytest.raises(PipelineError, match=message):
        tf.compress(graph, pipeline)


def test_rank_above_maximum_is_clamped_and_said(tmp_path):
    torch.manual_seed(0)
    graph = _graph("fx", nn.Sequential(nn.Linear(16, 12)), torch.randn(2, 16), tmp_path)
    _, report = tf.compress(graph, "svd(rank=500, force=true)")
    record = report.passes[0].records[0]
    assert record.action == "replaced" and record.details["ranks"] == [12]
    assert "12" in record.details["note"]


def test_pattern_matching_nothing_warns_and_include_limits(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    graph = _graph("fx", model, torch.randn(2, 64), tmp_path)
    _, report = tf.compress(graph, "svd(rank=8, include=nothing_like_this*)")
    assert any("nothing_like_this" in w for w in report.warnings)
    assert not report.passes[0].changed
    _, report = tf.compress(graph, "svd(rank=8, include=2)")
    assert [r.layer for r in report.passes[0].changed] == ["2"]
    _, report = tf.compress(graph, "svd(rank=8, exclude=0)")
    assert [r.layer for r in report.passes[0].changed] == ["2"]
    assert any(r.layer == "0" and "excluded" in r.reason for r in report.passes[0].records)


def test_depthwise_conv_is_skipped_with_reason(tmp_path):
    graph = _graph("fx", nn.Sequential(nn.Conv2d(8, 8, 3, groups=8)), torch.randn(1, 8, 6, 6), tmp_path)
    _, report = tf.compress(graph, "tucker2(rank=(2,2))")
    record = report.passes[0].records[0]
    assert record.action == "skipped" and "nothing to factor" in record.reason


def test_unprofitable_rank_is_skipped_with_reason(tmp_path):
    graph = _graph("fx", nn.Sequential(nn.Linear(16, 12)), torch.randn(2, 16), tmp_path)
    _, report = tf.compress(graph, "svd(rank=12)")
    record = report.passes[0].records[0]
    assert record.action == "skipped" and "would not reduce" in record.reason


class _SharedLinear(torch.nn.Module):
    """`l` is called twice: replacing it at one call site would change the other."""

    def __init__(self):
        super().__init__()
        self.l, self.h = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.h(self.l(self.l(x)))


@pytest.mark.parametrize("pipeline", ["svd(rank=2, force=true)", "tt(rank=2, force=true)", "alds(epsilon=0.1, force=true)",
                                      "lowrank_sparse(ratio=2)", "tucker2(rank=2, force=true)"])
def test_shared_weights_are_skipped_with_the_reason(pipeline):
    torch.manual_seed(0)
    module = _SharedLinear().eval()
    x = torch.randn(4, 8)
    graph = tf.capture(module, x)
    calibration = [torch.randn(4, 8).numpy() for _ in range(8)]
    compressed, report = tf.compress(graph, pipeline, calibration=calibration)
    records = [r for p in report.passes for r in p.records if r.layer == "l"]
    assert records and all(r.action == "skipped" and "shared weights" in r.reason for r in records)
    # l untouched: the compressed module still calls one `l` twice with the original weights
    assert torch.equal(compressed.to_torch().l.weight, module.l.weight)
