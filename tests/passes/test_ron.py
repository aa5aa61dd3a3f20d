"""ron (Gusak et al. 2021, reduced-order network): maxvol against brute force, exact reconstruction in the
span, networks built exactly low-rank reproduced at that rank, the reported error against our own
measurement, max-pool / batch norm / LeakyReLU / conv handling exact at full energy, the refusals (FLOPs,
error limit, ResNet-18 at 224), bad input, and what must still work after it (onnxruntime, int8, .tfz, TVM).
"""
from __future__ import annotations

import itertools
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision
from torch import nn

import tensorfold as tf
from tensorfold.ir.errors import PipelineError
from tensorfold.passes.decompose.ron import maxvol, rect_maxvol, reconstruction, window_rows

warnings.filterwarnings("ignore", category=DeprecationWarning)

BATCHES, BATCH = 5, 32   # split_feeds holds the 5th batch out


def _graph(front: str, model: nn.Module, shape, tools):
    x = torch.zeros(shape)
    if front == "fx":
        return tf.capture(model.eval(), x)
    path = tools.tmp_path / "model.onnx"  # batch norms kept as nodes (no constant folding), any batch
    torch.onnx.export(model.eval(), (x,), str(path), dynamo=False, do_constant_folding=False, opset_version=17,
                      input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return tf.load(str(path))


def _output(graph, x: np.ndarray) -> np.ndarray:
    return graph.run({graph.inputs[0].name: x})[graph.output_names[0]]


def _records(report, action: str | None = None) -> list:
    return [r for r in report.passes[0].records if action is None or r.action == action]


# ---- the math ---------------------------------------------------------------------------------------
def _volume(matrix: np.ndarray) -> float:
    return float(np.sqrt(max(np.linalg.det(matrix.T @ matrix), 0.0)))


@pytest.mark.parametrize("seed", range(4))
def test_maxvol_is_within_its_bound_of_the_best_square_submatrix(seed):
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((10, 3)) * rng.uniform(0.1, 3.0, (10, 1))  # rows of very different sizes
    rows = maxvol(matrix, tol=1.05)
    best = max(_volume(matrix[list(s)]) for s in itertools.combinations(range(10), 3))
    coefficients = matrix @ np.linalg.inv(matrix[rows])
    assert len(set(rows.tolist())) == 3
    assert np.max(np.abs(coefficients)) <= 1.05 + 1e-9           # dominant: what maxvol stops on
    assert _volume(matrix[rows]) >= best / (1.05 * np.sqrt(3)) ** 3  # and what that guarantees


@pytest.mark.parametrize("seed", range(3))
def test_rect_maxvol_is_within_its_bound_of_the_best_rectangular_submatrix(seed):
    rng = np.random.default_rng(seed)
    matrix = np.linalg.qr(rng.standard_normal((9, 2)) * rng.uniform(0.1, 3.0, (9, 1)))[0]
    rows = rect_maxvol(matrix, tol=1.1)
    count = len(rows)
    assert 2 <= count <= 9 and len(set(rows.tolist())) == count
    norms = np.linalg.norm(matrix @ np.linalg.pinv(matrix[rows]), axis=1)
    assert np.max(norms) <= 1.1 + 1e-9
    best = max(_volume(matrix[list(s)]) for s in itertools.combinations(range(9), count))
    assert _volume(matrix[rows]) >= best / (1.1 * np.sqrt(count)) ** 2
    tall = np.linalg.qr(rng.standard_normal((60, 3)))[0]
    uncapped = len(rect_maxvol(tall, tol=1.0))
    assert uncapped > 3 and len(rect_maxvol(tall, tol=1.0, max_rows=uncapped - 1)) == uncapped - 1  # the cap holds


def test_sampled_rows_reproduce_every_vector_in_the_span():
    rng = np.random.default_rng(1)
    basis = np.linalg.qr(rng.standard_normal((50, 6)))[0]
    rows = rect_maxvol(basis, tol=1.1, max_rows=9)
    z = basis @ rng.standard_normal((6, 40))  # 40 vectors in span(V)
    assert np.allclose(reconstruction(basis, rows) @ z[rows], z, atol=1e-10)
    outside = rng.standard_normal(50)
    assert not np.allclose(reconstruction(basis, rows) @ outside[rows], outside, atol=1e-3)


def test_window_rows_are_the_pool_windows_of_the_sampled_values_member_major():
    # (C, H, W) = (2, 4, 6), 2x2 windows: pooled (2, 2, 3); pooled value 7 = channel 1, (0, 1)
    rows = window_rows(np.array([0, 7]), (2, 4, 6), (2, 2))
    assert rows.tolist() == [0, 26, 1, 27, 6, 32, 7, 33]


# ---- networks built exactly low-rank ------------------------------------------------------------------
def _planted_linear(layer: nn.Linear, rank: int, rng) -> None:
    """Each output row a positive multiple of one of `rank` base rows (bias likewise): then
    ReLU(Wx + b) = c * ReLU(u_k x + beta_k) spans exactly `rank` functions, whatever x."""
    out, width = layer.weight.shape
    base, shift = rng.standard_normal((rank, width)), rng.standard_normal(rank)
    owner, scale = np.arange(out) % rank, rng.uniform(0.5, 2.0, out)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(scale[:, None] * base[owner] / np.sqrt(width)))
        layer.bias.copy_(torch.from_numpy(scale * shift[owner]))


def _low_rank_mlp(rank: int, seed: int = 0) -> nn.Module:
    model = nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 5))
    rng = np.random.default_rng(seed)
    _planted_linear(model[0], rank, rng)
    _planted_linear(model[2], rank, rng)
    return model.eval()


def _calibration(shape, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(BATCHES)]


@pytest.mark.parametrize("front", ["fx", "onnx"])
def test_exactly_low_rank_network_is_reproduced_at_that_rank(front, tools):
    graph = _graph(front, _low_rank_mlp(rank=4), (1, 16), tools)
    result, report = tf.compress(graph, "ron(rank=4)", calibration=_calibration((BATCH, 16)))
    records = _records(report, "replaced")
    assert [r.details.get("rank") for r in records] == [4, 4, None]  # the closing layer keeps all its outputs
    x = np.random.default_rng(9).standard_normal((64, 16)).astype(np.float32)  # fresh inputs, not calibration
    assert tools.relative_error(_output(graph, x), _output(result, x)) < 1e-5
    # the result is an MLP over the sampled rows: Linear(16 -> P1), Linear(P1 -> P2), Linear(P2 -> 5)
    rows = [r.details["rows"] for r in records[:2]]
    widths = [(l.spec.in_features, l.spec.out_features) for l in result.layers()]
    assert widths == [(16, rows[0]), (rows[0], rows[1]), (rows[1], 5)] and all(4 <= p <= 8 for p in rows)
    assert report.flops_after < report.flops_before / 3


@pytest.mark.parametrize("front", ["fx", "onnx"])
def test_reported_error_at_a_lower_rank_is_the_measured_one(front, tools):
    graph = _graph(front, _low_rank_mlp(rank=6, seed=1), (1, 16), tools)
    feeds = _calibration((BATCH, 16), seed=2)
    result, report = tf.compress(graph, "ron(rank=3, max_error=10)", calibration=feeds)
    closing = _records(report, "replaced")[-1]
    held_out = feeds[4]  # one batch in five is held out
    measured = tools.relative_error(_output(graph, held_out), _output(result, held_out))
    assert measured > 1e-2  # really lossy
    assert closing.error_calibration == pytest.approx(measured, rel=1e-3)


# ---- max-pool, batch norm, conv, LeakyReLU: exact at full energy -------------------------------------------
def _pool_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(12, 5)).eval()


def _bn_net(tools) -> nn.Module:
    model = nn.Sequential(nn.Conv1d(1, 4, 3, stride=2), nn.BatchNorm1d(4), nn.LeakyReLU(0.1), nn.Flatten(),
                          nn.Linear(56, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 3))
    return tools.randomize_batchnorms(model).eval()


def _ops(graph) -> list[str]:
    if hasattr(graph, "gm"):
        return [type(graph.gm.get_submodule(n.target)).__name__ for n in graph.gm.graph.nodes if n.op == "call_module"]
    return [n.op_type for n in graph.model.graph.node]


@pytest.mark.parametrize("front", ["fx", "onnx"])
def test_max_pool_becomes_the_max_over_four_sampled_rows_each(front, tools):
    graph = _graph(front, _pool_cnn(), (1, 2, 8, 8), tools)
    result, report = tf.compress(graph, "ron(energy=1.0, force=true)", calibration=_calibration((BATCH, 2, 8, 8)))
    x = np.random.default_rng(4).standard_normal((16, 2, 8, 8)).astype(np.float32)
    assert tools.relative_error(_output(graph, x), _output(result, x)) < 1e-5
    conv1, conv2, _ = _records(report, "replaced")
    assert conv1.details["rows_computed"] == 4 * conv1.details["rows"]  # four pre-pool rows per kept value
    assert conv1.details["width"] == 4 * 4 * 4 and conv2.details["width"] == 3 * 2 * 2
    ops = _ops(result)
    if front == "fx":
        assert ops.count("GroupMaxModule") == 2 and not {"Conv2d", "MaxPool2d"} & set(ops)
    else:
        assert ops.count("Max") == 2 and not {"Conv", "MaxPool"} & set(ops)
    assert [l.kind for l in result.layers()] == ["linear"] * 3


@pytest.mark.parametrize("front", ["fx", "onnx"])
def test_batch_norms_fold_into_the_sampled_rows(front, tools):
    graph = _graph(front, _bn_net(tools), (1, 1, 30), tools)
    result, report = tf.compress(graph, "ron(energy=1.0, force=true)", calibration=_calibration((BATCH, 1, 30)))
    x = np.random.default_rng(5).standard_normal((16, 1, 30)).astype(np.float32)
    assert tools.relative_error(_output(graph, x), _output(result, x)) < 1e-5
    assert len(_records(report, "folded")) == 2 and len(_records(report, "replaced")) == 3
    assert [l.kind for l in result.layers()] == ["linear"] * 3  # no batch norm, no conv left
    leaky = [op for op in _ops(result) if "leaky" in op.lower()]
    assert len(leaky) == 1


# ---- refusals -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("front", ["fx", "onnx"])
def test_a_model_it_cannot_help_comes_back_unchanged_with_reasons(front, tools):
    graph = _graph(front, _pool_cnn(), (1, 2, 8, 8), tools)
    feeds = _calibration((BATCH, 2, 8, 8))
    for options, reason in (("energy=1.0", "would not reduce FLOPs"), ("rank=2, max_error=0.001", "exceeds max_error")):
        result, report = tf.compress(graph, f"ron({options})", calibration=feeds)
        assert not report.passes[0].changed and report.flops_after == report.flops_before
        records = _records(report)
        assert len(records) == 3 and all(reason in r.reason for r in records), [r.reason for r in records]
        assert np.array_equal(_output(graph, feeds[0]), _output(result, feeds[0]))


@pytest.mark.parametrize("front", ["fx", "onnx"])
def test_resnet18_at_224_comes_back_unchanged_with_reasons(front, tools):
    model = torchvision.models.resnet18(weights=None).eval()
    graph = _graph(front, model, (1, 3, 224, 224), tools)
    feeds = [np.random.default_rng(6).standard_normal((2, 3, 224, 224)).astype(np.float32)]
    result, report = tf.compress(graph, "ron(rank=8)", calibration=feeds)
    assert not report.passes[0].changed and report.flops_after == report.flops_before
    records = {r.layer: r.reason for r in _records(report)}
    convs = [l.name for l in graph.layers() if l.kind == "conv"]
    assert len(convs) == 20 and all("too large for a dense matrix" in records[name] for name in convs)
    fc = next(l.name for l in graph.layers() if l.kind == "linear")
    assert "no chain of layers to reduce" in records[fc]
    assert np.array_equal(_output(graph, feeds[0]), _output(result, feeds[0]))


# ---- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("front", ["fx", "onnx"])
def test_bad_input_is_refused_naming_the_layer(front, tools):
    graph = _graph(front, _low_rank_mlp(rank=4), (1, 16), tools)
    with pytest.raises(PipelineError, match="no calibration data"):
        tf.compress(graph, "ron(rank=4)")
    first = graph.layers()[0].name
    with pytest.raises(PipelineError, match=rf"rank=49 exceeds the width of layer '{first}'.*48 values"):
        tf.compress(graph, "ron(rank=49)", calibration=_calibration((BATCH, 16)))
    with pytest.raises(PipelineError, match=rf"layer '{first}' needs at least 40 calibration samples"):
        tf.compress(graph, "ron(rank=40)", calibration=_calibration((8, 16)))
    with pytest.raises(PipelineError, match="not both"):
        tf.compress(graph, "ron(rank=4, energy=0.9)", calibration=_calibration((BATCH, 16)))


# ---- what must still work after it ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def pooled_fx():
    torch.manual_seed(0)
    graph = tf.capture(_pool_cnn(), torch.zeros(1, 2, 8, 8))
    result, _ = tf.compress(graph, "ron(energy=0.999, force=true)", calibration=_calibration((BATCH, 2, 8, 8)))
    return result


def test_onnx_int8_and_tfz_apply_after_it(pooled_fx, tmp_path, tools):
    x = np.random.default_rng(7).standard_normal((4, 2, 8, 8)).astype(np.float32)
    expected = _output(pooled_fx, x)
    pooled_fx.save(str(tmp_path / "m.onnx"))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert tools.relative_error(expected, session.run(None, {session.get_inputs()[0].name: x})[0]) < 1e-5
    quantized, report = tf.compress(pooled_fx, "int8", calibration=_calibration((BATCH, 2, 8, 8)))
    assert len([r for r in report.passes[0].records if r.action == "quantized"]) == 3
    assert tools.relative_error(expected, _output(quantized, x)) < 0.05
    coded, _ = tf.compress(pooled_fx, "kmeans, huffman")
    coded.save(str(tmp_path / "m.tfz"))
    assert tools.relative_error(_output(coded, x), _output(tf.load(str(tmp_path / "m.tfz")), x)) < 1e-5


def test_tvm_x86_build_runs_it(pooled_fx, tmp_path, tools):
    artifact = tf.build(pooled_fx, "x86", tmp_path / "artifact", progress=False)
    x = np.random.default_rng(8).standard_normal((1, 2, 8, 8)).astype(np.float32)
    outputs = artifact.load()(x)
    assert tools.relative_error(_output(pooled_fx, x), next(iter(outputs.values()))) < 1e-4
