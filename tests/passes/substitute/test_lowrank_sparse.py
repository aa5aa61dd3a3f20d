"""lowrank_sparse (Ma et al. 2019; docs/methods.md#lowrank_sparse): the ADMM math on planted structure,
the emitted graph read back from the graph itself and recomputed as one dense conv, true reports, and
what must still work after it (onnxruntime, int8, .pt2, .tfz, a TVM build)."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import tensorfold as tf
from tensorfold.ir.errors import PipelineError
from tensorfold.passes.decompose.lowrank_sparse import FitData, group_norms, lowrank_sparse

warnings.filterwarnings("ignore", category=DeprecationWarning)

SHAPE = (4, 8, 10, 10)   # one calibration batch
BATCHES = 5              # split_feeds holds the 5th out


def _relative(reference, value) -> float:
    reference = np.asarray(reference, np.float64)
    return float(np.linalg.norm(reference - np.asarray(value, np.float64)) / np.linalg.norm(reference))


def _planted(t_out: int, channels: int, taps: int, support, rank: int, rng, noise: float = 0.01) -> np.ndarray:
    """W = A (nonzero only on the `support` channels' columns) + a rank-`rank` B + noise, unfolded (T, S*taps)."""
    sparse = np.zeros((t_out, channels, taps))
    sparse[:, support] = rng.standard_normal((t_out, len(support), taps))
    low = rng.standard_normal((t_out, rank)) @ rng.standard_normal((rank, channels * taps)) / np.sqrt(rank)
    return sparse.reshape(t_out, -1) + low + noise * rng.standard_normal((t_out, channels * taps))


def _plant(conv: nn.Conv2d, support, rank: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    t_out, channels, kh, kw = conv.weight.shape
    weight = _planted(t_out, channels, kh * kw, support, rank, rng) / np.sqrt(channels * kh * kw)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(weight.reshape(conv.weight.shape)))
        if conv.bias is not None:
            conv.bias.copy_(torch.from_numpy(0.1 * rng.standard_normal(t_out)))


SUPPORT1, SUPPORT2 = [1, 2, 5, 6], [0, 3, 4, 8, 9, 11, 12, 15]


def _two_convs() -> nn.Module:
    """conv1 -> ReLU (post-activation objective) -> conv2 as the graph output (linear objective)."""
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, stride=2, padding=1))
    _plant(model[0], SUPPORT1, 2, seed=1)
    _plant(model[2], SUPPORT2, 3, seed=2)
    return model.eval()


def _graph(front: str, model: nn.Module, shape, tmp_path):
    x = torch.zeros(shape)
    if front == "fx":
        return tf.capture(model, x)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return tf.load(str(path))


def _calibration(shape=SHAPE, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(BATCHES)]


def _output(graph, x: np.ndarray) -> np.ndarray:
    return graph.run({graph.inputs[0].name: x})[graph.output_names[0]]


def _replaced(report) -> list:
    return [r for r in report.passes[0].records if r.action == "replaced"]


# ---- the math ---------------------------------------------------------------------------------------
def _fit_data(width: int, rows: int, seed: int) -> tuple[FitData, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, width)) @ (np.eye(width) + 0.2 * rng.standard_normal((width, width)))
    fit, held = x[: rows * 3 // 4], x[rows * 3 // 4:]
    return FitData(fit.T @ fit / len(fit), fit), held


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("refit", [False, True])
def test_math_zeroes_whole_channel_groups_and_recovers_the_planted_support(relu, refit):
    rng = np.random.default_rng(0)
    support = [1, 4, 7, 8, 13]
    weight = _planted(24, 16, 9, support, 3, rng)
    bias = 0.3 * rng.standard_normal(24)
    data, held = _fit_data(16 * 9, 3000, seed=1)
    result = lowrank_sparse(weight, bias, 9, data, keep=5, rank=3, relu=relu, refit=refit)
    norms = group_norms(result.sparse, 9)
    assert np.count_nonzero(norms) == 5 and np.all(norms[np.setdiff1d(np.arange(16), support)] == 0)
    assert list(result.kept) == support
    assert np.linalg.matrix_rank(result.second @ result.first) == 3
    act = (lambda z: np.maximum(z, 0)) if relu else (lambda z: z)
    error = _relative(act(held @ weight.T + bias), act(held @ result.dense.T + result.bias))
    assert error < (0.02 if refit else 0.5), error  # the noise is 1 % of W; without refit the lasso's shrinkage stays
    assert result.residual < 1e-2


@pytest.mark.parametrize("relu", [False, True])
def test_math_admm_primal_residual_shrinks_with_iterations(relu):
    rng = np.random.default_rng(10)
    weight = _planted(24, 16, 9, SUPPORT2, 3, rng)
    data, _ = _fit_data(16 * 9, 2000, seed=11)
    residuals = [lowrank_sparse(weight, None, 9, data, keep=8, rank=3, relu=relu, iters=iters).residual
                 for iters in (3, 30)]
    # ||A + B - M|| / ||W||: the thresholds follow the targets, so it settles near 1e-5 here, not at 0
    assert residuals[1] < residuals[0] / 3 and residuals[1] < 1e-4, residuals


def test_math_post_activation_objective_beats_the_linear_one_after_a_relu():
    """Half the outputs never fire: the linear objective spends the budget on their pre-activations, which
    the ReLU throws away; the post-activation objective spends it on the live half."""
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((16, 8 * 9)) / np.sqrt(72)
    bias = np.where(np.arange(16) < 8, 0.0, -6.0)
    data, held = _fit_data(72, 3000, seed=4)
    reference = np.maximum(held @ weight.T + bias, 0)
    errors = {}
    for relu in (False, True):
        result = lowrank_sparse(weight, bias, 9, data, keep=3, rank=4, relu=relu)
        errors[relu] = _relative(reference, np.maximum(held @ result.dense.T + result.bias, 0))
    assert errors[True] < 0.9 * errors[False], errors


def test_math_is_exact_with_every_channel_and_full_rank():
    rng = np.random.default_rng(5)
    weight, bias = rng.standard_normal((12, 40)), rng.standard_normal(12)
    data, _ = _fit_data(40, 500, seed=6)
    for relu in (False, True):
        result = lowrank_sparse(weight, bias, 5, data, keep=8, rank=12, relu=relu)
        assert _relative(weight, result.dense) < 1e-9 and np.allclose(result.bias, bias, atol=1e-9)


# ---- the emitted graph --------------------------------------------------------------------------------
def _branch_layers(graph):
    """(gather indices, A layer, B1 layer, B2 layer) read from the graph (FX modules / ONNX nodes)."""
    if hasattr(graph, "gm"):
        select = next(n for n in graph.gm.graph.nodes if n.op == "call_module"
                      and type(graph.gm.get_submodule(n.target)).__name__ == "ChannelSelect")
        index, gathered = graph.gm.get_submodule(select.target).index.numpy(), select.name
    else:
        gather = next(n for n in graph.model.graph.node if n.op_type == "Gather")
        index, gathered = graph.constant(gather.input[1]), gather.output[0]
        assert onnx.helper.get_attribute_value(gather.attribute[0]) == 1  # axis
    layers = graph.layers()
    sparse = next(l for l in layers if l.input == gathered)
    first = next(l for l in layers if l.input == graph.inputs[0].name)
    second = next(l for l in layers if l.input == first.output)
    return np.asarray(index), sparse, first, second


@pytest.mark.parametrize("front", ["fx", "onnx"])
def test_graph_equals_the_dense_conv_of_a_plus_b_and_drops_channels(front, tmp_path):
    model = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=2, dilation=2), nn.ReLU())
    _plant(model[0], SUPPORT1, 2, seed=7)
    graph = _graph(front, model.eval(), (1, 8, 11, 11), tmp_path)
    result, report = tf.compress(graph, "lowrank_sparse(sparsity=0.5, rank=3)",
                                 calibration=_calibration((4, 8, 11, 11)))
    (record,) = _replaced(report)
    index, sparse, first, second = _branch_layers(result)
    assert list(index) == SUPPORT1  # the planted channels, found from data
    assert sparse.spec.weight.shape == (16, 4, 3, 3) and sparse.in_shape[1] == 4  # pruned channels left the graph
    assert first.spec.weight.shape == (3, 8, 3, 3) and second.spec.weight.shape == (16, 3, 1, 1)
    assert (sparse.spec.stride, sparse.spec.dilation, first.spec.stride, first.spec.dilation) == ((2, 2), (2, 2)) * 2
    dense = np.einsum("tl,lshw->tshw", second.spec.weight[:, :, 0, 0].astype(np.float64), first.spec.weight)
    dense[:, index] += sparse.spec.weight
    bias = sparse.spec.bias.astype(np.float64) + (second.spec.bias if second.spec.bias is not None else 0)
    x = np.random.default_rng(8).standard_normal((3, 8, 11, 11)).astype(np.float32)
    expected = F.relu(F.conv2d(torch.from_numpy(x).double(), torch.from_numpy(dense), torch.from_numpy(bias),
                               stride=2, padding=2, dilation=2)).numpy()
    assert _relative(expected, _output(result, x)) < 1e-5
    assert record.params_after == result.total_params() and record.params_after < record.params_before
    assert record.flops_after == sum(l.cost.flops for l in result.layers()) < record.flops_before
    assert record.details["kept_channels"] == 4 and record.details["kept_fraction"] == 0.5
    assert record.details["rank"] == 3


@pytest.mark.parametrize("front", ["fx", "onnx"])
def test_linear_layer_gathers_features_and_equals_its_dense_math(front, tmp_path):
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    rng = np.random.default_rng(9)
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(_planted(16, 20, 1, [0, 3, 7, 8, 12, 13, 14, 15, 18, 19], 2, rng)))
    graph = _graph(front, model, (2, 20), tmp_path)
    result, report = tf.compress(graph, "lowrank_sparse(sparsity=0.5, rank=2, include=*0*)",
                                 calibration=[rng.standard_normal((32, 20)).astype(np.float32) for _ in range(5)])
    (record,) = _replaced(report)
    index, sparse, first, second = _branch_layers(result)
    assert list(index) == [0, 3, 7, 8, 12, 13, 14, 15, 18, 19] and sparse.spec.weight.shape == (16, 10)
    dense = second.spec.weight.astype(np.float64) @ first.spec.weight
    dense[:, index] += sparse.spec.weight
    x = rng.standard_normal((3, 20)).astype(np.float32)
    with torch.no_grad():
        hidden = F.relu(torch.from_numpy(x).double() @ torch.from_numpy(dense).T + torch.from_numpy(sparse.spec.bias))
        expected = model[2].double()(hidden).numpy()
    assert _relative(expected, _output(result, x)) < 1e-5
    assert record.details["error_held_out"] < 0.05


@pytest.mark.parametrize("front", ["fx", "onnx"])
def test_every_channel_at_full_rank_is_exact(front, tmp_path):
    graph = _graph(front, _two_convs(), SHAPE, tmp_path)
    result, report = tf.compress(graph, "lowrank_sparse(sparsity=0, rank=10000, force=true)",
                                 calibration=_calibration())
    assert len(_replaced(report)) == 2 and all("clamped" in r.details["note"] for r in _replaced(report))
    probe = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    assert _relative(_output(graph, probe), _output(result, probe)) < 1e-5


@pytest.mark.parametrize("front", ["fx", "onnx"])
def test_objective_follows_the_relu_and_reported_errors_are_true(front, tmp_path):
    model = _two_convs()
    graph = _graph(front, model, SHAPE, tmp_path)
    feeds = _calibration()
    result, report = tf.compress(graph, "lowrank_sparse(sparsity=0.5, rank=3)", calibration=feeds)
    conv1, conv2 = _replaced(report)
    assert conv1.details["objective"].startswith("post-activation")
    assert conv2.details["objective"].startswith("linear") and "not only a ReLU" in conv2.details["objective"]
    # conv1 reads the graph input, so its post-ReLU response is model[:2] before and ReLU(first Add) after
    with torch.no_grad():
        reference = [nn.Sequential(*list(model)[:2])(torch.from_numpy(x)).numpy() for x in feeds]
    add = _sum_tensor(result)
    after = [np.maximum(result.run({result.inputs[0].name: x}, record=[add])[add], 0) for x in feeds]
    fit = np.sqrt(sum(np.sum((r - a) ** 2) for r, a in zip(reference[:4], after[:4])) /
                  sum(np.sum(r ** 2) for r in reference[:4]))
    held = _relative(reference[4], after[4])
    assert conv1.details["error_fit"] == pytest.approx(fit, rel=1e-3, abs=1e-6)
    assert conv1.details["error_held_out"] == pytest.approx(held, rel=1e-3, abs=1e-6)
    assert conv1.details["error_held_out"] < 0.05 and conv2.details["error_held_out"] < 0.05  # planted + 1 % noise
    for record in (conv1, conv2):
        assert record.error_random is not None and record.error_calibration is not None
        assert np.isfinite(record.details["admm_residual"]) and record.details["admm_residual"] >= 0


def _sum_tensor(graph) -> str:
    if hasattr(graph, "gm"):
        return next(n.name for n in graph.gm.graph.nodes if n.op == "call_function" and "add" in str(n.target))
    return next(n.output[0] for n in graph.model.graph.node if n.op_type == "Add")


# ---- refusals and skips -------------------------------------------------------------------------------
def test_without_calibration_data_it_says_what_to_give():
    graph = tf.capture(_two_convs(), torch.zeros(SHAPE))
    with pytest.raises(PipelineError, match="lowrank_sparse.*data-driven.*calibration"):
        tf.compress(graph, "lowrank_sparse")


def test_grouped_depthwise_and_unprofitable_layers_are_skipped_with_reasons():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 16, 3, padding=1, groups=2),
                          nn.Conv2d(16, 2, 1)).eval()
    graph = tf.capture(model, torch.zeros(SHAPE))
    result, report = tf.compress(graph, "lowrank_sparse(sparsity=0.5, rank=2)", calibration=_calibration())
    reasons = {r.layer: r.reason for r in report.passes[0].records}
    assert reasons["0"].startswith("depthwise conv") and reasons["1"].startswith("grouped conv (groups=2)")
    assert "would not reduce FLOPs" in reasons["2"]
    assert not _replaced(report) and result.layer_cost() == graph.layer_cost()


@pytest.mark.parametrize("options, match", [("rank=2, ratio=2", "not both"), ("sparsity=1.5", r"\[0, 1\]")])
def test_bad_options_are_refused(options, match):
    graph = tf.capture(_two_convs(), torch.zeros(SHAPE))
    with pytest.raises(PipelineError, match=match):
        tf.compress(graph, f"lowrank_sparse({options})", calibration=_calibration())


# ---- what must still work after it ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def compressed_fx():
    graph = tf.capture(_two_convs(), torch.zeros(SHAPE))
    result, _ = tf.compress(graph, "lowrank_sparse(sparsity=0.5, rank=3)", calibration=_calibration())
    return graph, result


def test_saves_to_onnx_pt2_and_tfz(compressed_fx, tmp_path):
    _, result = compressed_fx
    x = np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
    expected = _output(result, x)
    result.save(str(tmp_path / "m.onnx"))
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert [n.op_type for n in model.graph.node].count("Gather") == 2
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert _relative(expected, session.run(None, {session.get_inputs()[0].name: x})[0]) < 1e-5
    result.save(str(tmp_path / "m.pt2"))
    program = torch.export.load(str(tmp_path / "m.pt2"))
    assert _relative(expected, program.module()(torch.from_numpy(x)).detach().numpy()) < 1e-5
    coded, _ = tf.compress(result, "kmeans, huffman")
    coded.save(str(tmp_path / "m.tfz"))
    assert _relative(_output(coded, x), _output(tf.load(str(tmp_path / "m.tfz")), x)) < 1e-5


def test_onnx_input_saves_and_runs_in_onnxruntime(tmp_path):
    graph = _graph("onnx", _two_convs(), SHAPE, tmp_path)
    result, _ = tf.compress(graph, "lowrank_sparse(sparsity=0.5, rank=3)", calibration=_calibration())
    result.save(str(tmp_path / "out.onnx"))
    x = np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)
    session = ort.InferenceSession(str(tmp_path / "out.onnx"), providers=["CPUExecutionProvider"])
    assert _relative(_output(result, x), session.run(None, {"input": x})[0]) < 1e-5


def test_int8_applies_after_it(compressed_fx, tmp_path):
    _, result = compressed_fx
    feeds = _calibration()
    quantized, report = tf.compress(result, "int8", calibration=feeds)
    ops = [n.op_type for n in quantized.model.graph.node]
    assert ops.count("Gather") == 2 and ops.count("Conv") == 6 and "QuantizeLinear" in ops
    assert len([r for r in report.passes[0].records if r.action == "quantized"]) == 6  # every branch conv
    x = feeds[0]
    assert _relative(_output(result, x), _output(quantized, x)) < 0.05
    quantized.save(str(tmp_path / "int8.onnx"))
    session = ort.InferenceSession(str(tmp_path / "int8.onnx"), providers=["CPUExecutionProvider"])
    assert _relative(_output(quantized, x), session.run(None, {session.get_inputs()[0].name: x})[0]) < 1e-5


def test_tvm_x86_build_runs_it(compressed_fx, tmp_path):
    _, result = compressed_fx
    artifact = tf.build(result, "x86", tmp_path / "artifact", progress=False)
    x = np.random.default_rng(4).standard_normal(SHAPE).astype(np.float32)
    outputs = artifact.load()(x)
    assert _relative(_output(result, x), next(iter(outputs.values()))) < 1e-4
