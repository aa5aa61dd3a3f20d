"""The ONNX adapter: ONNX in, ONNX out; what it reads, how it runs and edits, what it writes."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from torch.nn import functional as F

import tensorfold as tf
from tensorfold.ir import GRAPH_OUTPUT, OnnxGraph
from tensorfold.ir.errors import ExportError, InputShapeError
from tensorfold.ir.specs import BatchNorm, Conv, ConvTranspose, Linear


@pytest.fixture
def weights():
    rng = np.random.default_rng(0)
    arrays = {
        "conv.w": rng.standard_normal((6, 2, 3, 3)).astype(np.float32),   # groups 2
        "conv.b": rng.standard_normal(6).astype(np.float32),
        "deconv.w": rng.standard_normal((6, 4, 2, 2)).astype(np.float32),
        "gemm.B": rng.standard_normal((5, 4)).astype(np.float32),         # transB=1: (out, in)
        "gemm.C": rng.standard_normal(5).astype(np.float32),
        "mm.W": rng.standard_normal((5, 3)).astype(np.float32),
        "mm.b": rng.standard_normal(3).astype(np.float32),
    }
    return arrays, rng


@pytest.fixture
def model_path(tools, weights):
    """x -> Conv (asymmetric pads) -> BN -> Relu -> ConvTranspose -> GAP -> Flatten -> Gemm -> MatMul + Add."""
    arrays, rng = weights
    arrays = {**arrays, **tools.bn_initializers("bn", 6, rng)}
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], name="conv", pads=[0, 1, 2, 1], strides=[2, 1],
                         dilations=[1, 2], group=2),
        tools.bn_node("bn", "c", "n"),
        helper.make_node("Relu", ["n"], ["r"], name="relu"),
        helper.make_node("ConvTranspose", ["r", "deconv.w"], ["d"], name="deconv", strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["d"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "gemm.B", "gemm.C"], ["g"], name="gemm", transB=1, alpha=0.5, beta=2.0),
        helper.make_node("MatMul", ["g", "mm.W"], ["m"], name="mm"),
        helper.make_node("Add", ["m", "mm.b"], ["y"], name="mm_add"),
    ]
    model = tools.make_onnx_model(nodes, {"x": ("batch", 4, 9, 8)}, {"y": ("batch", 3)}, arrays)
    return tools.save_onnx(model, "net.onnx")


def _reference(x: np.ndarray, arrays: dict, bn: dict) -> dict[str, np.ndarray]:
    """The same network in torch, written out by hand."""
    t = torch.from_numpy(x)
    w = {k: torch.from_numpy(np.array(v)) for k, v in {**arrays, **bn}.items()}
    padded = F.pad(t, (1, 1, 0, 2))  # W: 1 before, 1 after; H: 0 before, 2 after
    c = F.conv2d(padded, w["conv.w"], w["conv.b"], stride=(2, 1), dilation=(1, 2), groups=2)
    n = F.batch_norm(c, w["bn.mean"], w["bn.var"], w["bn.gamma"], w["bn.beta"], eps=1e-5)
    d = F.conv_transpose2d(torch.relu(n), w["deconv.w"], stride=2, padding=1)
    f = d.mean((2, 3))
    g = 0.5 * f @ w["gemm.B"].T + 2.0 * w["gemm.C"]
    y = g @ w["mm.W"] + w["mm.b"]
    return {"c": c.numpy(), "n": n.numpy(), "d": d.numpy(), "y": y.numpy()}


def test_layers_are_read_with_their_specs(model_path, weights):
    arrays, _ = weights
    graph = tf.load(model_path, input_shapes={"x": (2, 4, 9, 8)})
    layers = graph.layers()
    assert [(l.name, l.kind) for l in layers] == [("conv", "conv"), ("bn", "batchnorm"),
                                                  ("deconv", "conv_transpose"), ("gemm", "linear"), ("mm", "linear")]
    conv, bn, deconv, gemm, mm = (l.spec for l in layers)
    assert isinstance(conv, Conv) and conv.padding == ((0, 2), (1, 1)) and conv.stride == (2, 1)
    assert conv.dilation == (1, 2) and conv.groups == 2 and conv.in_channels == 4
    np.testing.assert_array_equal(conv.weight, arrays["conv.w"])
    assert isinstance(bn, BatchNorm) and bn.num_features == 6
    assert isinstance(deconv, ConvTranspose) and deconv.padding == (1, 1) and deconv.stride == (2, 2)
    assert isinstance(gemm, Linear)
    np.testing.assert_allclose(gemm.weight, 0.5 * arrays["gemm.B"], rtol=1e-7)  # alpha folded in
    np.testing.assert_allclose(gemm.bias, 2.0 * arrays["gemm.C"], rtol=1e-7)    # beta folded in
    np.testing.assert_array_equal(mm.weight, arrays["mm.W"].T)
    np.testing.assert_array_equal(mm.bias, arrays["mm.b"])
    assert layers[4].facts["nodes_extra"] == ["mm_add"] and layers[4].output == "y"
    # shapes, with the symbolic batch given by input_shapes
    assert graph.inputs[0].shape == (2, 4, 9, 8)
    assert layers[0].in_shape == (2, 4, 9, 8) and layers[0].out_shape == (2, 6, 5, 6)
    assert layers[2].out_shape == (2, 4, 8, 10)
    assert layers[4].in_shape == (2, 5) and layers[4].out_shape == (2, 3)


def test_run_matches_a_hand_written_reference_and_records(model_path, weights, tools):
    arrays, rng = weights
    graph = tf.load(model_path, input_shapes={"x": (2, 4, 9, 8)})
    bn = {k: numpy_helper.to_array(t) for k, t in ((t.name, t) for t in graph.to_onnx().graph.initializer)
          if k.startswith("bn.")}
    x = rng.standard_normal((2, 4, 9, 8)).astype(np.float32)
    values = graph.run({"x": x}, record=["c", "n", "d"])
    expected = _reference(x, arrays, bn)
    for name in ("c", "n", "d", "y"):
        assert tools.relative_error(expected[name], values[name]) < 1e-5, name
    assert graph.output_names == ["y"]


def test_consumers_unknown_ops_and_params(model_path, weights):
    graph = tf.load(model_path)
    assert graph.consumers("c") == ["bn"]
    assert graph.consumers("y") == [GRAPH_OUTPUT]
    assert graph.consumers("x") == ["conv"]
    assert graph.producer("n").name == "bn" and graph.producer("y").name == "mm"
    assert graph.unknown_ops() == []
    arrays, _ = weights
    assert graph.total_params() == sum(a.size for a in arrays.values()) + 4 * 6


def test_symbolic_dims_default_to_one_and_input_shapes_override_them(model_path):
    assert tf.load(model_path).inputs[0].shape == (1, 4, 9, 8)
    assert tf.load(model_path, input_shapes={"x": [3, 4, 9, 8]}).inputs[0].shape == (3, 4, 9, 8)
    with pytest.raises(InputShapeError, match="nope"):
        tf.load(model_path, input_shapes={"nope": (1, 4, 9, 8)})


def test_weights_from_constant_nodes_and_non_constant_weights(tools):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["w"], name="w_const", value=numpy_helper.from_array(w)),
             helper.make_node("Conv", ["x", "w"], ["c"], name="conv_const"),
             helper.make_node("Conv", ["c", "w_in"], ["d"], name="conv_input_weight"),
             helper.make_node("MatMul", ["d", "d"], ["y"], name="two_activations")]
    model = tools.make_onnx_model(nodes, {"x": (1, 3, 4, 4), "w_in": (4, 4, 1, 1)}, {"y": 4}, {})
    graph = tf.load(tools.save_onnx(model))
    layers = {l.name: l for l in graph.layers()}
    assert set(layers) == {"conv_const", "conv_input_weight"}  # a MatMul of two activations is no layer
    np.testing.assert_array_equal(layers["conv_const"].spec.weight, w)
    assert layers["conv_input_weight"].spec is None and "not a constant" in layers["conv_input_weight"].unusable


def test_params_are_counted_wherever_the_weights_live(tools):
    """Initializers, Constant nodes and ConstantOfShape; not int64 shape constants (a report of
    0 params before made every ratio of a file from another exporter wrong)."""
    model = tools.wild_onnx_model(12)
    fill = helper.make_tensor("fill", onnx.TensorProto.FLOAT, [1], [0.5])
    model.graph.node.extend([
        helper.make_node("ConstantOfShape", ["bias_shape"], ["bias_filled"], name="bias_of_shape", value=fill),
        helper.make_node("Add", ["logits", "bias_filled"], ["shifted"])])
    model.graph.initializer.append(numpy_helper.from_array(np.array([10], np.int64), "bias_shape"))
    model.graph.output.append(helper.make_tensor_value_info("shifted", onnx.TensorProto.FLOAT, [None, 10]))
    float_tensors = [numpy_helper.to_array(t) for t in model.graph.initializer]
    float_tensors += [numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"]
    expected = sum(a.size for a in float_tensors if a.dtype == np.float32) + 10
    graph = tf.load(tools.save_onnx(model), input_shapes={"x": (1, 3, 32, 32)})
    assert graph.total_params() == expected
    assert {"conv1", "conv2"} <= {l.name for l in graph.layers() if l.spec is not None}  # Constant-node weights
    _, report = tf.compress(graph, "fold_bn")
    assert report.params_before == expected and report.params_after == expected - 4 * 8  # BN's 4 vectors


def test_materialize_weights_stores_computed_weights_as_initializers(tools):
    graph = tf.load(tools.save_onnx(tools.wild_onnx_model(11)), input_shapes={"x": (1, 3, 32, 32)})
    x = graph.random_inputs(0)
    before = graph.run(x)
    params = graph.total_params()
    lifted = graph.materialize_weights()
    assert set(lifted) == {"conv1.w", "conv1.b", "conv2.w"}
    initializers = {t.name for t in graph.model.graph.initializer}
    assert set(lifted) <= initializers
    assert not any(n.op_type == "Constant" and n.output[0] in lifted for n in graph.model.graph.node)
    after = graph.run(x)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert graph.total_params() == params


@pytest.mark.parametrize("auto_pad, expected", [("SAME_UPPER", ((1, 2), (1, 1))), ("SAME_LOWER", ((2, 1), (1, 1)))])
def test_auto_pad_is_read_as_explicit_pads(auto_pad, expected, tools):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((3, 2, 4, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", auto_pad=auto_pad, strides=[2, 1])]
    path = tools.save_onnx(tools.make_onnx_model(nodes, {"x": (1, 2, 9, 7)}, {"y": 4}, {"w": w}))
    graph = tf.load(path)
    spec = graph.layers()[0].spec
    assert spec.padding == expected
    # the explicit pads compute what auto_pad computes
    edited = graph.copy()
    edited.replace(["conv"], [spec])
    assert all(n.op_type == "Conv" and not any(a.name == "auto_pad" for a in n.attribute)
               for n in edited.to_onnx().graph.node)
    feed = graph.random_inputs(0)
    np.testing.assert_allclose(edited.run(feed)["y"], graph.run(feed)["y"], rtol=1e-6, atol=1e-6)


def test_replace_edits_a_copy_and_keeps_output_names(model_path, tools):
    graph = tf.load(model_path)
    proto_before = graph.to_onnx().SerializeToString()
    feed = graph.random_inputs(3)
    before = graph.run(feed)["y"]
    rng = np.random.default_rng(3)
    edited = graph.copy()
    mm = edited.layer("mm").spec
    # MatMul+Add (2 nodes) -> two linear specs: a 5->5 identity-like step, then the original
    identity = Linear(np.eye(5, dtype=np.float32), None)
    edited.replace(["mm"], [identity, mm])
    assert edited.output_names == ["y"]
    assert [l.kind for l in edited.layers()][-2:] == ["linear", "linear"]
    assert "mm_add" not in {n.name for n in edited.to_onnx().graph.node}
    np.testing.assert_allclose(edited.run(feed)["y"], before, rtol=1e-5, atol=1e-6)

    conv = edited.layer("conv").spec
    scale = rng.uniform(0.5, 2, 6).astype(np.float32)
    scaled = Conv(conv.weight * scale[:, None, None, None], conv.bias * scale, conv.stride, conv.padding,
                  conv.dilation, conv.groups)
    inverse = BatchNorm(np.zeros(6, np.float32), np.ones(6, np.float32) - 1e-5, 1 / scale, np.zeros(6, np.float32))
    edited.replace(["conv"], [scaled, inverse])
    assert tools.relative_error(before, edited.run(feed)["y"]) < 1e-5
    onnx.checker.check_model(edited.to_onnx(), full_check=True)
    # the original is untouched
    assert graph.to_onnx().SerializeToString() == proto_before
    np.testing.assert_array_equal(graph.run(feed)["y"], before)


def test_replace_names_never_collide(model_path):
    graph = tf.load(model_path).copy()
    for _ in range(3):
        spec = graph.layers()[0].spec
        graph.replace([graph.layers()[0].name], [spec])
    names = [n.name for n in graph.to_onnx().graph.node]
    initializers = [t.name for t in graph.to_onnx().graph.initializer]
    assert len(names) == len(set(names)) and len(initializers) == len(set(initializers))
    onnx.checker.check_model(graph.to_onnx(), full_check=True)


def test_unnamed_nodes_get_unique_names(tools):
    w = np.ones((2, 2, 1, 1), np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"]), helper.make_node("Conv", ["a", "w"], ["y"])]
    graph = tf.load(tools.save_onnx(tools.make_onnx_model(nodes, {"x": (1, 2, 3, 3)}, {"y": 4}, {"w": w})))
    names = [l.name for l in graph.layers()]
    assert len(names) == 2 and len(set(names)) == 2 and all(names)


def test_save_writes_a_checked_model_and_refuses_other_formats(model_path, tools, tmp_path):
    graph = tf.load(model_path)
    out = tmp_path / "copy.onnx"
    graph.save(str(out))
    saved = onnx.load(str(out))
    onnx.checker.check_model(saved, full_check=True)
    feed = graph.random_inputs(0)
    np.testing.assert_allclose(tools.run_onnxruntime(str(out), feed)[0], graph.run(feed)["y"], rtol=1e-6)
    with pytest.raises(ExportError, match="copy.pt"):
        graph.save(str(tmp_path / "copy.pt"))
    with pytest.raises(ExportError, match="stays ONNX"):
        graph.to_torch()


def test_load_leaves_the_file_alone(model_path):
    data = open(model_path, "rb").read()
    graph = tf.load(model_path, input_shapes={"x": (2, 4, 9, 8)})
    graph.layers()
    tf.compress(graph, "fold_bn")
    assert open(model_path, "rb").read() == data
    assert isinstance(graph, OnnxGraph) and graph.source == model_path


def test_tensors_read_only_inside_a_subgraph_survive_an_edit(tools):
    # an If branch reads the outer initializer `shift` and the outer tensor `r`; nothing else does
    rng = np.random.default_rng(4)
    inits = {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "shift": np.full((1, 4, 1, 1), 3, np.float32),
             **tools.bn_initializers("bn", 4, rng)}
    then_branch = helper.make_graph([helper.make_node("Add", ["r", "shift"], ["then_out"], name="then_add")], "then",
                                    [], [helper.make_tensor_value_info("then_out", onnx.TensorProto.FLOAT, None)])
    else_branch = helper.make_graph([helper.make_node("Neg", ["r"], ["else_out"], name="else_neg")], "else",
                                    [], [helper.make_tensor_value_info("else_out", onnx.TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), tools.bn_node("bn", "c", "n"),
             helper.make_node("Relu", ["n"], ["r"], name="relu"),
             helper.make_node("Cast", ["flag"], ["cond"], name="cast", to=onnx.TensorProto.BOOL),
             helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_branch, else_branch=else_branch)]
    model = tools.make_onnx_model(nodes, {"x": (1, 3, 6, 6), "flag": (1,)}, {"y": 4}, inits)
    path = tools.save_onnx(model)
    folded, report = tf.compress(tf.load(path), "fold_bn")
    assert [r.action for r in report.passes[0].records] == ["folded"]
    names = {t.name for t in folded.to_onnx().graph.initializer}
    assert "shift" in names and "relu" in {n.name for n in folded.to_onnx().graph.node}
    out = str(tools.tmp_path / "folded.onnx")
    folded.save(out)
    for flag in (0.0, 1.0):
        feed = {"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32), "flag": np.array([flag], np.float32)}
        assert tools.relative_error(tools.run_onnxruntime(path, feed)[0], tools.run_onnxruntime(out, feed)[0]) < 1e-5


def test_a_read_inside_a_subgraph_counts_as_a_consumer(tools):
    # conv's output feeds the BN and, inside an If branch, an Add: folding would change what the branch sees
    rng = np.random.default_rng(5)
    inits = {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32), **tools.bn_initializers("bn", 4, rng)}
    then_branch = helper.make_graph([helper.make_node("Add", ["n", "c"], ["then_out"], name="then_add")], "then",
                                    [], [helper.make_tensor_value_info("then_out", onnx.TensorProto.FLOAT, None)])
    else_branch = helper.make_graph([helper.make_node("Neg", ["n"], ["else_out"], name="else_neg")], "else",
                                    [], [helper.make_tensor_value_info("else_out", onnx.TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), tools.bn_node("bn", "c", "n"),
             helper.make_node("Cast", ["flag"], ["cond"], name="cast", to=onnx.TensorProto.BOOL),
             helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_branch, else_branch=else_branch)]
    path = tools.save_onnx(tools.make_onnx_model(nodes, {"x": (1, 3, 6, 6), "flag": (1,)}, {"y": 4}, inits))
    graph = tf.load(path)
    assert graph.consumers("c") == ["bn", "branch"]
    folded, report = tf.compress(graph, "fold_bn")
    (record,) = report.passes[0].records
    assert record.action == "skipped" and "other consumers (branch)" in record.reason
