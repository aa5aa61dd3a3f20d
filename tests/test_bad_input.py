"""Bad input gives a TensorfoldError that names the file / node / layer, never a raw library error."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from onnx import helper
from torch import nn

import tensorfold as tf
from tensorfold.ir.errors import CaptureError, ExportError, InputShapeError, InvalidModelError


def _raises(kind: type, call, *names: str) -> str:
    """Run `call`, expect exactly a `kind` (a TensorfoldError), return its message after checking it names `names`."""
    assert issubclass(kind, tf.TensorfoldError)
    with pytest.raises(tf.TensorfoldError) as info:
        call()
    assert type(info.value) is kind, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    for name in names:
        assert name in message, f"{name!r} not in: {message}"
    return message


def _conv_bn(tools) -> nn.Module:
    return tools.randomize_batchnorms(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())).eval()


@pytest.fixture
def onnx_path(tools):
    return tools.export_to_onnx(_conv_bn(tools), torch.randn(1, 3, 8, 8), "good.onnx")


# ---- files that are not ONNX models ----------------------------------------------------------------------
@pytest.mark.parametrize("keep", [0.5, 0.9, 40])
def test_truncated_onnx_file(keep, onnx_path, tmp_path):
    data = open(onnx_path, "rb").read()
    size = int(len(data) * keep) if isinstance(keep, float) else keep
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[:size])
    _raises(CaptureError, lambda: tf.load(str(path)), str(path))


@pytest.mark.parametrize("content", [b"hello, I am not a model\n", b"\x89PNG\r\n\x1a\n" + bytes(range(256)), b""])
def test_not_an_onnx_file(content, tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    _raises(CaptureError, lambda: tf.load(str(path)), str(path))


def test_a_torch_checkpoint_is_not_onnx(tools, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(_conv_bn(tools).state_dict(), path)
    _raises(CaptureError, lambda: tf.load(str(path)), str(path))


def test_missing_file(tmp_path):
    path = tmp_path / "absent.onnx"
    _raises(CaptureError, lambda: tf.load(str(path)), str(path))


# ---- an op tensorfold does not know ----------------------------------------------------------------------
def test_unknown_contrib_op_is_reported_and_the_rest_folds(tools):
    rng = np.random.default_rng(0)
    inits = {"w1": rng.standard_normal((6, 3, 3, 3)).astype(np.float32),
             "w2": rng.standard_normal((4, 6, 1, 1)).astype(np.float32),
             **tools.bn_initializers("bn1", 6, rng), **tools.bn_initializers("bn2", 4, rng)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             tools.bn_node("bn1", "c1", "n1"),
             helper.make_node("Gelu", ["n1"], ["g"], name="gelu", domain="com.microsoft"),
             helper.make_node("Conv", ["g", "w2"], ["c2"], name="conv2"),
             tools.bn_node("bn2", "c2", "y")]
    model = tools.make_onnx_model(nodes, {"x": (1, 3, 8, 8)}, {"y": 4}, inits, opsets={"com.microsoft": 1})
    path = tools.save_onnx(model, "contrib.onnx")
    graph = tf.load(path)
    assert graph.unknown_ops() == [("gelu", "com.microsoft.Gelu")]
    assert [l.name for l in graph.layers()] == ["conv1", "bn1", "conv2", "bn2"]
    assert graph.layer("conv2").in_shape == (1, 6, 8, 8), "shapes past the unknown op come from a run"

    folded, report = tf.compress(graph, "fold_bn")
    assert report.unknown_ops == [("gelu", "com.microsoft.Gelu")]
    assert "com.microsoft.Gelu" in report.table()
    assert [r.action for r in tools.fold_bn_records(report)] == ["folded", "folded"]
    out = str(tools.tmp_path / "folded.onnx")
    folded.save(out)
    saved = onnx.load(out)
    assert [n.op_type for n in saved.graph.node] == ["Conv", "Gelu", "Conv"]
    assert saved.graph.node[1].domain == "com.microsoft"
    for seed in (0, 1):
        feed = graph.random_inputs(seed)
        (reference,), (value,) = tools.run_onnxruntime(path, feed), tools.run_onnxruntime(out, feed)
        assert tools.relative_error(reference, value) < 1e-5


# ---- modules that cannot be captured ---------------------------------------------------------------------
class DataDependentBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:  # neither fx nor torch.export can follow a branch on tensor values
            return self.conv(x)
        return -self.conv(x)


def test_untraceable_module_is_a_capture_error_naming_the_class():
    message = _raises(CaptureError, lambda: tf.capture(DataDependentBranch(), torch.randn(1, 3, 8, 8)),
                      "DataDependentBranch")
    assert "torch.fx" in message and "torch.export" in message


def test_capture_of_a_non_module_and_non_tensor_inputs():
    _raises(CaptureError, lambda: tf.capture(lambda x: x, torch.randn(1, 3)), "function")
    _raises(CaptureError, lambda: tf.capture(nn.Linear(3, 2), np.zeros((1, 3), np.float32)), "Linear")


# ---- weights that are not finite ---------------------------------------------------------------------------
@pytest.mark.parametrize("where, value", [("0.weight", float("nan")), ("1.running_var", float("inf")),
                                          ("1.bias", float("-inf"))])
def test_non_finite_weights_in_a_module(where, value, tools):
    module = _conv_bn(tools)
    module.state_dict()[where].view(-1)[1] = value
    graph = tf.capture(module, torch.randn(1, 3, 8, 8))
    layer = where.split(".")[0]
    message = _raises(InvalidModelError, lambda: tf.compress(graph, "fold_bn"), f"'{layer}'")
    assert "NaN or Inf" in message


def test_non_finite_weights_in_an_onnx_file(tools):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    w[2, 1, 0, 0] = np.nan
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="the_conv"), tools.bn_node("bn", "c", "y")]
    model = tools.make_onnx_model(nodes, {"x": (1, 3, 8, 8)}, {"y": 4}, {"w": w, **tools.bn_initializers("bn", 4, rng)})
    graph = tf.load(tools.save_onnx(model))
    _raises(InvalidModelError, lambda: tf.compress(graph, "fold_bn"), "the_conv", "weight")


# ---- input shapes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 3, 16, 16), (1, 4, 8, 8), (1, 3, 8), (1, 3, 8, 8, 1)])
def test_input_shape_contradicting_the_file(shape, onnx_path):
    _raises(InputShapeError, lambda: tf.load(onnx_path, input_shapes={"input": shape}), onnx_path, "input")


def test_input_shape_for_an_unknown_input(onnx_path):
    _raises(InputShapeError, lambda: tf.load(onnx_path, input_shapes={"image": (1, 3, 8, 8)}), onnx_path, "image")


def test_running_with_a_wrong_shape(onnx_path, tools):
    graph = tf.load(onnx_path)
    _raises(InputShapeError, lambda: graph.run({"input": np.zeros((1, 3, 9, 8), np.float32)}), onnx_path, "input")
    fx_graph = tf.capture(_conv_bn(tools), torch.randn(1, 3, 8, 8))
    name = fx_graph.inputs[0].name
    _raises(InputShapeError, lambda: fx_graph.run({name: np.zeros((1, 3, 8), np.float32)}), "Sequential", name)


@pytest.mark.parametrize("shape", [(8, 8), (1, 1, 3, 8, 8)])
def test_capture_with_wrong_rank_inputs(shape, tools):
    _raises(InputShapeError, lambda: tf.capture(_conv_bn(tools), torch.randn(shape)), "Sequential", str(shape))


def test_capture_with_wrong_channel_count(tools):
    _raises(InputShapeError, lambda: tf.capture(_conv_bn(tools), torch.randn(1, 5, 8, 8)), "Sequential")


# ---- writing over the input ----------------------------------------------------------------------------------
def test_save_onto_the_input_file_is_refused(onnx_path, monkeypatch, tmp_path):
    data = open(onnx_path, "rb").read()
    graph = tf.load(onnx_path)
    folded, _ = tf.compress(graph, "fold_bn")
    _raises(ExportError, lambda: graph.save(onnx_path), onnx_path)
    _raises(ExportError, lambda: folded.save(onnx_path), onnx_path)
    monkeypatch.chdir(tmp_path)  # the same file by other spellings
    (tmp_path / "sub").mkdir()
    _raises(ExportError, lambda: folded.save(os.path.basename(onnx_path)), onnx_path)
    _raises(ExportError, lambda: folded.save(f"./sub/../{os.path.basename(onnx_path)}"), onnx_path)
    assert open(onnx_path, "rb").read() == data
    folded.save(str(tmp_path / "other.onnx"))  # any other path is fine
    assert open(onnx_path, "rb").read() == data


def test_save_into_a_missing_folder(onnx_path, tmp_path):
    graph = tf.load(onnx_path)
    _raises(ExportError, lambda: graph.save(str(tmp_path / "no" / "such" / "dir" / "out.onnx")), "out.onnx")


def test_errors_are_tensorfold_errors():
    for kind in (CaptureError, ExportError, InputShapeError, InvalidModelError):
        assert issubclass(kind, tf.TensorfoldError)
    assert tf.TensorfoldError is tf.ir.TensorfoldError


def test_capture_of_a_failing_forward_is_not_called_a_shape_error():
    # traces fine (Embedding is a leaf), then fails to run for a reason that is not a shape: float indices
    with pytest.raises(CaptureError, match="Embedding|indices|scalar type") as caught:
        tf.capture(torch.nn.Sequential(torch.nn.Embedding(10, 4)), torch.randn(1, 3))
    assert not isinstance(caught.value, InputShapeError)
    assert "forward failed on example inputs" in str(caught.value)
