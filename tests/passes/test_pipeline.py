"""The pipeline: text parsing, option checking, and reports that tell the truth.

A lossy test-only pass (it perturbs conv weights) gives errors large enough that a
wrong figure in the report cannot hide in float32 noise; each figure is recomputed here
with plain torch/numpy.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import tensorfold as tf
from tensorfold.ir.errors import PipelineError
from tensorfold.ir.specs import Conv
from tensorfold.passes import LayerRecord, Option, PassReport, parse, register
from tensorfold.passes import registry
from tensorfold.passes.measure import ErrorInputs, layer_error
from tensorfold.passes.pipeline import normalize

PERTURB = "test_perturb_conv"


# ---- parsing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, steps", [
    ("fold_bn", [("fold_bn", {})]),
    ("fold_bn, svd(rank=8)", [("fold_bn", {}), ("svd", {"rank": 8})]),
    ("fold_bn,svd(energy=0.95)", [("fold_bn", {}), ("svd", {"energy": 0.95})]),
    ("tucker2(rank=evbmf(weaken=0.8))", [("tucker2", {"rank": "evbmf(weaken=0.8)"})]),
    ("fold_bn, tucker2(rank=evbmf(weaken=0.8), min_rank=2), int8",
     [("fold_bn", {}), ("tucker2", {"rank": "evbmf(weaken=0.8)", "min_rank": 2}), ("int8", {})]),
    ("cp(rank=ratio(0.25), fine_tune=false)", [("cp", {"rank": "ratio(0.25)", "fine_tune": False})]),
    ("  svd( rank = 8 , energy=1e-3 ) ", [("svd", {"rank": 8, "energy": 1e-3})]),
    ("quant(mode='kmeans', bits=4)", [("quant", {"mode": "kmeans", "bits": 4})]),
    ("x()", [("x", {})]),
])
def test_parse(text, steps):
    assert parse(text) == steps


@pytest.mark.parametrize("text", [
    "fold_bn,, svd", "svd(rank=8", "svd(rank=8))", "svd(rank)", "svd(=3)", "1svd", "svd rank=8", "",
])
def test_parse_rejects_malformed_text(text):
    with pytest.raises(PipelineError):
        parse(text)


def test_normalize_accepts_lists_of_text_and_pairs():
    assert normalize(["fold_bn", ("svd", {"rank": 4}), "cp(rank=2), int8"]) == [
        ("fold_bn", {}), ("svd", {"rank": 4}), ("cp", {"rank": 2}), ("int8", {})]


# ---- option and name checking -------------------------------------------------------------------------
@pytest.fixture
def small_graph():
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    return tf.capture(module, torch.randn(1, 3, 8, 8))


@pytest.fixture
def perturb_pass():
    """Register a lossy test pass for the test's duration; it counts its calls."""
    calls = []

    @register(PERTURB, options={"scale": Option(float, 0.05, "relative size of the weight noise"),
                                "limit": Option(int, 100, "at most this many layers")})
    def perturb(graph, options, context):
        calls.append(options)
        graph = graph.copy()
        report = PassReport(PERTURB)
        rng = np.random.default_rng(0)
        convs = [layer.name for layer in graph.layers() if layer.kind == "conv"][:options["limit"]]
        for name in convs:
            layer = graph.layer(name)
            spec = layer.spec
            noise = rng.standard_normal(spec.weight.shape).astype(np.float32)
            weight = spec.weight + options["scale"] * np.abs(spec.weight).mean() * noise
            new = Conv(weight, spec.bias, spec.stride, spec.padding, spec.dilation, spec.groups)
            err_random, err_calibration = layer_error(graph, [layer], [new], context.inputs)
            graph.replace([name], [new])
            report.add(LayerRecord(name, "replaced", method="noise", error_random=err_random,
                                   error_calibration=err_calibration))
        return graph, report

    yield calls
    registry.PASSES.pop(PERTURB, None)


def test_unknown_pass_lists_the_registered_passes(small_graph):
    with pytest.raises(PipelineError) as info:
        tf.compress(small_graph, "fold_bn, no_such_pass")
    assert "no_such_pass" in str(info.value) and "fold_bn" in str(info.value)


def test_unknown_option_lists_the_pass_options(small_graph):
    with pytest.raises(PipelineError) as info:
        tf.compress(small_graph, "fold_bn(rank=3)")
    message = str(info.value)
    assert "rank" in message and "bn_before_conv" in message and "fold_bn" in message


@pytest.mark.parametrize("text, option", [
    ("fold_bn(bn_before_conv=maybe)", "bn_before_conv"),
    ("fold_bn(bn_before_conv=2)", "bn_before_conv"),
    (f"{PERTURB}(scale=big)", "scale"),
    (f"{PERTURB}(limit=2.5)", "limit"),
    (f"{PERTURB}(limit=true)", "limit"),
])
def test_bad_option_value_is_an_error(text, option, small_graph, perturb_pass):
    with pytest.raises(PipelineError) as info:
        tf.compress(small_graph, text)
    assert option in str(info.value)
    assert not perturb_pass, "no pass may run when a step is invalid"


def test_every_step_is_checked_before_any_runs(small_graph, perturb_pass):
    with pytest.raises(PipelineError):
        tf.compress(small_graph, f"{PERTURB}, fold_bn(oops=1)")
    assert not perturb_pass


def test_options_are_coerced_and_defaults_filled(small_graph, perturb_pass):
    _, report = tf.compress(small_graph, [(PERTURB, {"limit": 3.0})])
    assert perturb_pass == [{"scale": 0.05, "limit": 3}]
    assert report.passes[0].options == {"scale": 0.05, "limit": 3}
    _, report = tf.compress(small_graph, "fold_bn(bn_before_conv=False)")
    assert report.passes[0].options == {"bn_before_conv": False}


def test_compress_of_a_module_needs_example_inputs():
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.raises(tf.TensorfoldError):
        tf.compress(module, "fold_bn")
    folded, report = tf.compress(module, "fold_bn", example_inputs=torch.randn(1, 3, 8, 8))
    assert len(report.passes[0].changed) == 1


# ---- reports are true ----------------------------------------------------------------------------------
class _TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3, stride=2)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        y = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(y.mean((2, 3)))


def _independent_cost(model: _TwoConvs, side: int) -> tuple[int, int]:
    """Params (weights, biases and BN's four vectors) and FLOPs (2 per multiply-add; BN 2 per element)."""
    mid = (side - 3) // 2 + 1
    params = sum(p.numel() for p in model.parameters()) + 2 * model.bn1.num_features
    flops = (2 * 8 * side * side * 3 * 9 + 2 * 8 * side * side + 2 * 4 * mid * mid * 8 * 9 + 2 * 4 * 5)
    return params, flops


def test_report_figures_equal_an_independent_recomputation(tools, perturb_pass):
    torch.manual_seed(1)
    model = tools.randomize_batchnorms(_TwoConvs()).eval()
    side = 10
    calibration = [torch.randn(1, 3, side, side) for _ in range(3)]
    graph = tf.capture(model, calibration[0])
    result, report = tf.compress(graph, f"fold_bn, {PERTURB}(scale=0.05)", calibration=calibration)

    # totals: the graph's own counts, and those agree with a count by hand
    params_before, flops_before = _independent_cost(model, side)
    assert report.params_before == graph.total_params() == params_before
    assert report.flops_before == graph.layer_cost().flops == flops_before
    folded_params = params_before - 4 * 8  # BN's gamma, beta, mean, var are gone
    assert report.params_after == result.total_params() == folded_params
    assert report.flops_after == result.layer_cost().flops == flops_before - 2 * 8 * side * side
    fold_report, perturb_report = report.passes
    assert (fold_report.params_before, fold_report.params_after) == (params_before, folded_params)
    assert (perturb_report.params_before, perturb_report.params_after) == (folded_params, folded_params)

    # the result's convs, read back from the graph, to recompute every figure with torch
    conv1, conv2 = [layer.spec for layer in result.layers() if layer.kind == "conv"]
    w1, b1 = torch.from_numpy(conv1.weight).double(), torch.from_numpy(conv1.bias).double()
    w2, b2 = torch.from_numpy(conv2.weight).double(), torch.from_numpy(conv2.bias).double()
    m = model.double()

    def layer_errors(feeds: list[torch.Tensor]) -> tuple[float, float]:
        pairs1, pairs2 = [], []
        with torch.no_grad():
            for x in feeds:
                x = x.double()
                folded_conv1 = F.batch_norm(m.conv1(x), m.bn1.running_mean, m.bn1.running_var, m.bn1.weight,
                                            m.bn1.bias, eps=m.bn1.eps)  # what the perturb pass replaced
                pairs1.append((folded_conv1.numpy(), F.conv2d(x, w1, b1, padding=1).numpy()))
                # conv2 is measured on its input in the graph as it was: conv1 already perturbed
                hidden = torch.relu(F.conv2d(x, w1, b1, padding=1))
                pairs2.append((m.conv2(hidden).numpy(), F.conv2d(hidden, w2, b2, stride=2).numpy()))
        return tools.pooled_relative_error(pairs1), tools.pooled_relative_error(pairs2)

    def output_error(feeds: list[torch.Tensor]) -> float:
        with torch.no_grad():
            pairs = [(m(x.double()).numpy(), result.to_torch()(x.float()).double().numpy()) for x in feeds]
        return tools.pooled_relative_error(pairs)

    random_feeds = [torch.from_numpy(f[graph.inputs[0].name]) for f in ErrorInputs.for_graph(graph).random]
    records = {r.layer: r for r in perturb_report.records}
    assert set(records) == {"conv1", "conv2"}
    for feeds, attribute in ((calibration, "error_calibration"), (random_feeds, "error_random")):
        expected1, expected2 = layer_errors(feeds)
        assert 1e-3 < expected1 < 0.5 and 1e-3 < expected2 < 0.5  # the pass is lossy: figures mean something
        assert getattr(records["conv1"], attribute) == pytest.approx(expected1, rel=1e-4)
        assert getattr(records["conv2"], attribute) == pytest.approx(expected2, rel=1e-4)
    assert report.output_error_calibration == pytest.approx(output_error(calibration), rel=1e-3)
    assert report.output_error_random == pytest.approx(output_error(random_feeds), rel=1e-3)
    assert perturb_report.output_error_calibration == pytest.approx(report.output_error_calibration, rel=1e-3)
    assert fold_report.output_error_calibration < 1e-6


def test_report_save_writes_the_records_as_json(tools, tmp_path):
    model = tools.randomize_batchnorms(_TwoConvs()).eval()
    graph = tf.capture(model, torch.randn(1, 3, 10, 10))
    _, report = tf.compress(graph, "fold_bn")
    path = tmp_path / "report.json"
    report.save(path)
    data = json.loads(path.read_text())
    assert data["model"] == "_TwoConvs"
    assert data["params_before"] == report.params_before and data["params_after"] == report.params_after
    assert data["flops_before"] == report.flops_before and data["flops_after"] == report.flops_after
    assert data["output_error_random"] == pytest.approx(report.output_error_random)
    assert data["params_ratio"] == pytest.approx(report.params_before / report.params_after)
    (fold,) = data["passes"]
    assert fold["name"] == "fold_bn" and fold["options"] == {"bn_before_conv": True}
    assert [(r["layer"], r["action"], r["method"]) for r in fold["records"]] == [("bn1", "folded", "into conv1")]
    assert fold["records"][0]["error_random"] == pytest.approx(report.passes[0].records[0].error_random)
    table = report.table()
    assert "bn1" in table and "folded" in table


def _snapshot_fx(graph) -> tuple:
    layers = [(l.name, l.kind, l.input, l.output, l.in_shape, {k: v.copy() for k, v in _arrays(l).items()})
              for l in graph.layers()]
    state = {k: v.clone() for k, v in graph.to_torch().state_dict().items()}
    return layers, str(graph.to_torch().graph), state


def _arrays(layer) -> dict:
    from tensorfold.ir.specs import arrays_of
    return {} if layer.spec is None else arrays_of(layer.spec)


def _assert_same_layers(before, after) -> None:
    assert [l[:5] for l in before] == [l[:5] for l in after]
    for (_, _, _, _, _, arrays_before), (_, _, _, _, _, arrays_after) in zip(before, after):
        assert arrays_before.keys() == arrays_after.keys()
        for key in arrays_before:
            np.testing.assert_array_equal(arrays_before[key], arrays_after[key])


def test_compress_does_not_mutate_an_fx_input_graph(tools, perturb_pass):
    model = tools.randomize_batchnorms(_TwoConvs()).eval()
    graph = tf.capture(model, torch.randn(1, 3, 10, 10))
    feed = graph.random_inputs(5)
    outputs_before = graph.run(feed)
    layers_before, code_before, state_before = _snapshot_fx(graph)
    tf.compress(graph, f"fold_bn, {PERTURB}")
    layers_after, code_after, state_after = _snapshot_fx(graph)
    _assert_same_layers(layers_before, layers_after)
    assert code_before == code_after
    assert state_before.keys() == state_after.keys()
    assert all(torch.equal(state_before[k], state_after[k]) for k in state_before)
    for name, value in graph.run(feed).items():
        np.testing.assert_array_equal(value, outputs_before[name])


def test_compress_does_not_mutate_an_onnx_input_graph(tools):
    model = tools.randomize_batchnorms(_TwoConvs()).eval()
    path = tools.export_to_onnx(model, torch.randn(1, 3, 10, 10))
    file_bytes = open(path, "rb").read()
    graph = tf.load(path)
    proto_before = graph.to_onnx().SerializeToString()
    layers_before = [(l.name, l.kind, l.input, l.output, l.in_shape, {k: v.copy() for k, v in _arrays(l).items()})
                     for l in graph.layers()]
    feed = graph.random_inputs(5)
    outputs_before = graph.run(feed)
    result, _ = tf.compress(graph, "fold_bn")
    assert tools.count_batchnorm_nodes_onnx(result.to_onnx()) == 0
    assert graph.to_onnx().SerializeToString() == proto_before
    assert tools.count_batchnorm_nodes_onnx(graph.to_onnx()) == 1
    _assert_same_layers(layers_before, [(l.name, l.kind, l.input, l.output, l.in_shape, _arrays(l))
                                        for l in graph.layers()])
    for name, value in graph.run(feed).items():
        np.testing.assert_array_equal(value, outputs_before[name])
    assert open(path, "rb").read() == file_bytes
    assert onnx.load(path).graph.node  # still a whole model
