"""fold_bn on the layer zoo (exact to 1e-5, BN gone) and where it must refuse (with the reason).

Every output is checked against the original computed independently of tensorfold: the
torch module itself for FX, a fresh onnxruntime session on the original file for ONNX.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import helper
from torch import nn

import tensorfold as tf
from tensorfold.ir.errors import InvalidModelError

TOLERANCE = 1e-5


def _fold_fx(module: nn.Module, example: torch.Tensor, tools, passes: str = "fold_bn"):
    """Capture, fold, and compare the result with the module on two fresh inputs."""
    module = module.eval()
    graph = tf.capture(module, example)
    folded, report = tf.compress(graph, passes)
    result = folded.to_torch()
    generator = torch.Generator().manual_seed(3)
    inputs = [torch.randn(example.shape, generator=generator) for _ in range(2)]
    error = max(tools.relative_error(tools.torch_output(module, x), tools.torch_output(result, x)) for x in inputs)
    return folded, report, error


def _fold_onnx(path: str, tools, passes: str = "fold_bn", feeds: dict | None = None):
    """Load, fold, save, check, and compare onnxruntime on the saved file with the original file."""
    graph = tf.load(path)
    folded, report = tf.compress(graph, passes)
    out_path = str(tools.tmp_path / "folded.onnx")
    folded.save(out_path)
    saved = onnx.load(out_path)
    onnx.checker.check_model(saved, full_check=True)
    errors = []
    for seed in (11, 12):
        feed = feeds or graph.random_inputs(seed)
        reference = tools.run_onnxruntime(path, feed)
        value = tools.run_onnxruntime(out_path, feed)
        errors += [tools.relative_error(a, b) for a, b in zip(reference, value)]
    return folded, report, max(errors), saved


def _assert_all_folded(report, remaining_bn: int, tools, count: int = 1) -> None:
    folded = tools.fold_bn_records(report, "folded")
    assert len(folded) == count and not tools.fold_bn_records(report, "skipped"), \
        [(r.layer, r.action, r.reason) for r in tools.fold_bn_records(report)]
    assert remaining_bn == 0


def _assert_exact_on_both_fronts(module: nn.Module, example: torch.Tensor, tools) -> None:
    """fold_bn on the FX capture and on the ONNX export: exact, and no batch norm left."""
    folded, report, error = _fold_fx(module, example, tools)
    assert error < TOLERANCE
    _assert_all_folded(report, tools.count_batchnorm_nodes_fx(folded.to_torch()), tools)

    _, onnx_report, onnx_error, saved = _fold_onnx(tools.export_to_onnx(module, example), tools)
    assert onnx_error < TOLERANCE
    _assert_all_folded(onnx_report, tools.count_batchnorm_nodes_onnx(saved), tools)


# ---- the layer zoo, torch side -----------------------------------------------------------------
CONV2D = {
    "k3": dict(kernel_size=3),
    "k3_pad1": dict(kernel_size=3, padding=1),
    "stride2_pad1": dict(kernel_size=3, stride=2, padding=1),
    "stride_hw_pad_hw": dict(kernel_size=(3, 5), stride=(2, 1), padding=(1, 2)),
    "same_even_kernel": dict(kernel_size=4, padding="same"),  # torch pads 1 before, 2 after: asymmetric
    "same_dilated": dict(kernel_size=3, padding="same", dilation=2),
    "dilation2": dict(kernel_size=3, dilation=2, padding=1),
    "groups4": dict(kernel_size=3, padding=1, groups=4),
    "depthwise": dict(kernel_size=3, padding=1, groups=8, out_channels=8),
    "depthwise_multiplier2": dict(kernel_size=3, stride=2, padding=1, groups=8, out_channels=16),
    "pointwise": dict(kernel_size=1),
}


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("case", list(CONV2D))
def test_conv2d_bn_zoo(case, bias, tools):
    options = dict(CONV2D[case])
    out_channels = options.pop("out_channels", 12)
    conv = nn.Conv2d(8, out_channels, bias=bias, **options)
    module = tools.randomize_batchnorms(nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU()))
    example = torch.randn(2, 8, 13, 11)
    folded, report, error = _fold_fx(module, example, tools)
    assert error < TOLERANCE
    _assert_all_folded(report, tools.count_batchnorm_nodes_fx(folded.to_torch()), tools)

    path = tools.export_to_onnx(module, example)
    assert tools.count_batchnorm_nodes_onnx(onnx.load(path)) == 1
    if case == "same_dilated":
        # torch exports auto_pad=SAME_UPPER with dilations, which onnxruntime refuses to run: the
        # original cannot be measured, so compress stops with an error that says so
        with pytest.raises(InvalidModelError, match="onnxruntime"):
            tf.compress(tf.load(path), "fold_bn")
        return
    _, onnx_report, onnx_error, saved = _fold_onnx(path, tools)
    assert onnx_error < TOLERANCE
    _assert_all_folded(onnx_report, tools.count_batchnorm_nodes_onnx(saved), tools)


CONV1D = {
    "k3_pad1": dict(kernel_size=3, padding=1),
    "stride2_dilation2": dict(kernel_size=3, stride=2, dilation=2, padding=2),
    "same_even_kernel": dict(kernel_size=4, padding="same"),
    "groups2": dict(kernel_size=5, groups=2),
    "depthwise": dict(kernel_size=3, groups=6, out_channels=6),
}


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("case", list(CONV1D))
def test_conv1d_bn_zoo(case, bias, tools):
    options = dict(CONV1D[case])
    out_channels = options.pop("out_channels", 10)
    module = tools.randomize_batchnorms(nn.Sequential(nn.Conv1d(6, out_channels, bias=bias, **options),
                                                      nn.BatchNorm1d(out_channels)))
    example = torch.randn(2, 6, 17)
    _assert_exact_on_both_fronts(module, example, tools)


CONV_TRANSPOSE = {
    "k3": dict(kernel_size=3),
    "stride2_pad1_outpad1": dict(kernel_size=3, stride=2, padding=1, output_padding=1),
    "groups2_dilation2": dict(kernel_size=3, groups=2, dilation=2, padding=1),
    "k4_stride2_groups4": dict(kernel_size=4, stride=2, padding=1, groups=4),
}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("case", list(CONV_TRANSPOSE))
def test_conv_transpose2d_bn_zoo(case, bias, tools):
    module = tools.randomize_batchnorms(nn.Sequential(
        nn.ConvTranspose2d(8, 12, bias=bias, **CONV_TRANSPOSE[case]), nn.BatchNorm2d(12)))
    example = torch.randn(2, 8, 7, 6)
    _assert_exact_on_both_fronts(module, example, tools)


def test_conv_transpose1d_bn(tools):
    module = tools.randomize_batchnorms(nn.Sequential(
        nn.ConvTranspose1d(6, 4, kernel_size=3, stride=2, groups=2), nn.BatchNorm1d(4)))
    folded, report, error = _fold_fx(module, torch.randn(2, 6, 9), tools)
    assert error < TOLERANCE
    _assert_all_folded(report, tools.count_batchnorm_nodes_fx(folded.to_torch()), tools)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_linear_bn1d(bias, tools):
    module = tools.randomize_batchnorms(nn.Sequential(nn.Linear(20, 12, bias=bias), nn.BatchNorm1d(12), nn.ReLU()))
    example = torch.randn(5, 20)
    _assert_exact_on_both_fronts(module, example, tools)


def test_bn_before_unpadded_conv_is_folded_and_exact(tools):
    module = tools.randomize_batchnorms(nn.Sequential(nn.BatchNorm2d(6), nn.Conv2d(6, 10, 3, stride=2, groups=2)))
    example = torch.randn(2, 6, 12, 12)
    folded, report, error = _fold_fx(module, example, tools)
    assert error < TOLERANCE
    _assert_all_folded(report, tools.count_batchnorm_nodes_fx(folded.to_torch()), tools)
    assert tools.fold_bn_records(report, "folded")[0].details["direction"] == "before"

    _, onnx_report, onnx_error, saved = _fold_onnx(tools.export_to_onnx(module, example), tools)
    assert onnx_error < TOLERANCE
    _assert_all_folded(onnx_report, tools.count_batchnorm_nodes_onnx(saved), tools)


def test_bn1d_before_linear_is_folded_and_exact(tools):
    module = tools.randomize_batchnorms(nn.Sequential(nn.BatchNorm1d(16), nn.Linear(16, 7)))
    folded, report, error = _fold_fx(module, torch.randn(4, 16), tools)
    assert error < TOLERANCE
    _assert_all_folded(report, tools.count_batchnorm_nodes_fx(folded.to_torch()), tools)


def test_every_bn_of_a_chain_is_folded(tools):
    module = tools.randomize_batchnorms(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8),
        nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 10), nn.BatchNorm1d(10)))
    folded, report, error = _fold_fx(module, torch.randn(2, 3, 16, 16), tools)
    assert error < TOLERANCE
    _assert_all_folded(report, tools.count_batchnorm_nodes_fx(folded.to_torch()), tools, count=4)


# ---- the layer zoo, ONNX built by hand ----------------------------------------------------------
def _conv_bn_onnx(tools, weight_shape, conv_attrs, in_shape, bias=True, seed=0, epsilon=1e-5):
    rng = np.random.default_rng(seed)
    channels = weight_shape[0]
    inits = {"w": rng.standard_normal(weight_shape).astype(np.float32)}
    conv_inputs = ["x", "w"]
    if bias:
        inits["b"] = rng.standard_normal(channels).astype(np.float32)
        conv_inputs.append("b")
    inits.update(tools.bn_initializers("bn", channels, rng))
    nodes = [helper.make_node("Conv", conv_inputs, ["c"], name="conv", **conv_attrs),
             tools.bn_node("bn", "c", "y", epsilon), helper.make_node("Relu", ["y"], ["z"], name="relu")]
    return tools.save_onnx(tools.make_onnx_model(nodes, {"x": in_shape}, {"z": len(in_shape)}, inits), "conv_bn.onnx")


ONNX_CONV = {
    # pads = [begin_h, begin_w, end_h, end_w]
    "pads_asymmetric": ((12, 8, 3, 3), dict(pads=[0, 1, 2, 1]), (2, 8, 11, 10)),
    "pads_asymmetric_stride2_groups2": ((12, 4, 3, 3), dict(pads=[1, 0, 0, 2], strides=[2, 2], group=2),
                                        (2, 8, 11, 10)),
    "pads_asymmetric_dilation2": ((12, 8, 3, 2), dict(pads=[2, 0, 1, 1], dilations=[2, 2]), (2, 8, 11, 10)),
    "depthwise_pads_asymmetric": ((8, 1, 3, 3), dict(pads=[1, 1, 0, 0], group=8), (2, 8, 9, 9)),
    "auto_pad_same_upper_stride2": ((12, 8, 4, 4), dict(auto_pad="SAME_UPPER", strides=[2, 2]), (2, 8, 11, 10)),
    "auto_pad_same_lower": ((12, 8, 2, 2), dict(auto_pad="SAME_LOWER"), (2, 8, 9, 9)),
    "conv1d_pads_asymmetric": ((10, 6, 3), dict(pads=[2, 0], strides=[2]), (2, 6, 15)),
}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("case", list(ONNX_CONV))
def test_onnx_conv_bn_zoo(case, bias, tools):
    weight_shape, attrs, in_shape = ONNX_CONV[case]
    path = _conv_bn_onnx(tools, weight_shape, attrs, in_shape, bias=bias, epsilon=1e-3)
    _, report, error, saved = _fold_onnx(path, tools)
    assert error < TOLERANCE
    _assert_all_folded(report, tools.count_batchnorm_nodes_onnx(saved), tools)


GEMM = {  # transA, transB, alpha, beta, bias shape (None: no C)
    "plain": (0, 0, 1.0, 1.0, (6,)),
    "transB_alpha_beta": (0, 1, 0.5, 2.0, (6,)),
    "transA": (1, 0, 1.5, 0.5, (6,)),
    "transA_transB_no_bias": (1, 1, 2.0, 1.0, None),
    "bias_row_1xN": (0, 1, 1.0, -1.0, (1, 6)),
    "bias_scalar": (0, 0, 1.0, 3.0, (1,)),
}


@pytest.mark.parametrize("case", list(GEMM))
def test_onnx_gemm_bn(case, tools):
    trans_a, trans_b, alpha, beta, bias_shape = GEMM[case]
    rng = np.random.default_rng(1)
    rows, features, outputs = 5, 9, 6  # rows != features, so a transposed input is noticed
    inits = {"B": rng.standard_normal((outputs, features) if trans_b else (features, outputs)).astype(np.float32)}
    gemm_inputs = ["A", "B"]
    if bias_shape is not None:
        inits["C"] = rng.standard_normal(bias_shape).astype(np.float32)
        gemm_inputs.append("C")
    inits.update(tools.bn_initializers("bn", outputs, rng))
    nodes = [helper.make_node("Gemm", gemm_inputs, ["g"], name="gemm", transA=trans_a, transB=trans_b,
                              alpha=alpha, beta=beta), tools.bn_node("bn", "g", "y")]
    a_shape = (features, rows) if trans_a else (rows, features)
    path = tools.save_onnx(tools.make_onnx_model(nodes, {"A": a_shape}, {"y": (rows, outputs)}, inits))
    folded, report, error, saved = _fold_onnx(path, tools)
    assert error < TOLERANCE
    _assert_all_folded(report, tools.count_batchnorm_nodes_onnx(saved), tools)
    record = tools.fold_bn_records(report, "folded")[0]
    # the folded chain costs what a (rows x features) @ (features x outputs) product costs
    assert record.flops_after == 2 * rows * features * outputs


@pytest.mark.parametrize("add", ["none", "bias_second", "bias_first"])
def test_onnx_matmul_add_bn(add, tools):
    rng = np.random.default_rng(2)
    inits = {"W": rng.standard_normal((9, 6)).astype(np.float32)}
    inits.update(tools.bn_initializers("bn", 6, rng))
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="matmul")]
    bn_input = "m"
    if add != "none":
        inits["b"] = rng.standard_normal(6).astype(np.float32)
        operands = ["m", "b"] if add == "bias_second" else ["b", "m"]
        nodes.append(helper.make_node("Add", operands, ["a"], name="add"))
        bn_input = "a"
    nodes.append(tools.bn_node("bn", bn_input, "y"))
    path = tools.save_onnx(tools.make_onnx_model(nodes, {"x": (4, 9)}, {"y": (4, 6)}, inits))
    _, report, error, saved = _fold_onnx(path, tools)
    assert error < TOLERANCE
    _assert_all_folded(report, tools.count_batchnorm_nodes_onnx(saved), tools)
    assert not any(n.op_type == "Add" for n in saved.graph.node), "the Add of the bias is folded too"


def test_onnx_conv_transpose_bn(tools):
    rng = np.random.default_rng(3)
    inits = {"w": rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "b": rng.standard_normal(6).astype(np.float32)}
    inits.update(tools.bn_initializers("bn", 6, rng))
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["c"], name="deconv", strides=[2, 2], group=2,
                              pads=[1, 1, 1, 1], output_padding=[1, 0]), tools.bn_node("bn", "c", "y")]
    path = tools.save_onnx(tools.make_onnx_model(nodes, {"x": (2, 8, 5, 6)}, {"y": 4}, inits))
    _, report, error, saved = _fold_onnx(path, tools)
    assert error < TOLERANCE
    _assert_all_folded(report, tools.count_batchnorm_nodes_onnx(saved), tools)


# ---- where fold_bn must refuse, and says why ------------------------------------------------------
def _only_record(report, tools):
    records = tools.fold_bn_records(report)
    assert len(records) == 1, records
    return records[0]


def test_bn_before_padded_conv_is_skipped_for_padding(tools):
    module = tools.randomize_batchnorms(nn.Sequential(nn.BatchNorm2d(6), nn.Conv2d(6, 8, 3, padding=1)))
    example = torch.randn(2, 6, 9, 9)
    folded, report, error = _fold_fx(module, example, tools)
    record = _only_record(report, tools)
    assert record.action == "skipped" and "pad" in record.reason and "conv" in record.reason.lower()
    assert tools.count_batchnorm_nodes_fx(folded.to_torch()) == 1
    assert error < TOLERANCE

    _, onnx_report, onnx_error, saved = _fold_onnx(tools.export_to_onnx(module, example), tools)
    record = _only_record(onnx_report, tools)
    assert record.action == "skipped" and "pad" in record.reason
    assert tools.count_batchnorm_nodes_onnx(saved) == 1
    assert onnx_error < TOLERANCE


class _SharedProducer(nn.Module):
    """conv feeds a BN and, beside it, a ReLU: folding would change what the ReLU sees."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + torch.relu(y)


def test_bn_whose_producer_has_other_consumers_is_skipped(tools):
    module = tools.randomize_batchnorms(_SharedProducer())
    example = torch.randn(2, 4, 8, 8)
    folded, report, error = _fold_fx(module, example, tools)
    record = _only_record(report, tools)
    assert record.action == "skipped"
    assert "other consumers" in record.reason and "relu" in record.reason
    assert tools.count_batchnorm_nodes_fx(folded.to_torch()) == 1
    assert error < TOLERANCE

    _, onnx_report, onnx_error, saved = _fold_onnx(tools.export_to_onnx(module, example), tools)
    record = _only_record(onnx_report, tools)
    assert record.action == "skipped" and "other consumers" in record.reason and "Relu" in record.reason
    assert tools.count_batchnorm_nodes_onnx(saved) == 1 and onnx_error < TOLERANCE


class _SharedWeights(nn.Module):
    """One conv module called twice: folding its BN into it would change the other call."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.conv(self.bn(self.conv(x)))


def test_bn_after_a_shared_conv_is_skipped(tools):
    module = tools.randomize_batchnorms(_SharedWeights())
    folded, report, error = _fold_fx(module, torch.randn(1, 4, 8, 8), tools)
    record = _only_record(report, tools)
    assert record.action == "skipped" and "shared weights" in record.reason
    assert error < TOLERANCE


def test_bn_after_a_reflect_padded_conv_is_skipped(tools):
    # the folded conv would be rebuilt with zero padding: the borders would change
    module = tools.randomize_batchnorms(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
                                                      nn.BatchNorm2d(4)))
    folded, report, error = _fold_fx(module, torch.randn(1, 3, 8, 8), tools)
    record = _only_record(report, tools)
    assert record.action == "skipped" and "reflect" in record.reason
    assert error < TOLERANCE


class _SharedBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv1(x)) + self.bn(self.conv2(x))


def test_a_bn_module_called_twice_is_skipped(tools):
    module = tools.randomize_batchnorms(_SharedBatchNorm())
    folded, report, error = _fold_fx(module, torch.randn(1, 3, 6, 6), tools)
    assert [r.action for r in tools.fold_bn_records(report)] == ["skipped", "skipped"]
    assert all("shared weights" in r.reason for r in tools.fold_bn_records(report))
    assert error < TOLERANCE


def test_onnx_weights_behind_transpose_and_identity_are_read(tools):
    # an export without constant folding: Linear without bias is MatMul(x, Transpose(W)), and a fresh
    # BN's equal tensors (var = gamma = 1, mean = beta = 0) reach it through Identity nodes
    module = nn.Sequential(nn.Linear(20, 12, bias=False), nn.BatchNorm1d(12)).eval()
    path = tools.export_to_onnx(module, torch.randn(5, 20))
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert "Transpose" in ops and "Identity" in ops, ops
    folded, report, error, saved = _fold_onnx(path, tools)
    assert error < TOLERANCE
    _assert_all_folded(report, tools.count_batchnorm_nodes_onnx(saved), tools)
    assert [n.op_type for n in saved.graph.node] == ["Gemm"], "the Transpose and Identity nodes are gone"
    assert folded.total_params() == report.params_after == 20 * 12 + 12


def test_bn_over_the_wrong_axis_of_a_linear_is_skipped(tools):
    # Linear on (N, C, F) and BatchNorm1d(C): the BN scales rows, not the linear's outputs
    module = tools.randomize_batchnorms(nn.Sequential(nn.Linear(8, 5), nn.BatchNorm1d(3)))
    folded, report, error = _fold_fx(module, torch.randn(2, 3, 8), tools)
    record = _only_record(report, tools)
    assert record.action == "skipped" and "not per-feature" in record.reason
    assert error < TOLERANCE


def test_train_mode_model_is_folded_with_running_statistics(tools):
    module = tools.randomize_batchnorms(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
        nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))).train()
    state_before = {k: v.clone() for k, v in module.state_dict().items()}
    example = torch.randn(4, 3, 10, 10)
    graph = tf.capture(module, example)
    assert graph.training
    assert module.training and all(m.training for m in module.modules()), "capture must not touch the user's module"

    folded, report = tf.compress(graph, "fold_bn")
    assert any("train mode" in w for w in report.warnings), report.warnings
    assert len(tools.fold_bn_records(report, "folded")) == 2
    assert tools.count_batchnorm_nodes_fx(folded.to_torch()) == 0
    assert module.training and all(m.training for m in module.modules())
    for key, value in module.state_dict().items():  # running statistics untouched (no batch-stat update)
        assert torch.equal(value, state_before[key]), key

    eval_module = copy.deepcopy(module).eval()
    for x in (example, torch.randn(4, 3, 10, 10)):
        assert tools.relative_error(tools.torch_output(eval_module, x),
                                    tools.torch_output(folded.to_torch(), x)) < TOLERANCE


def test_bn_without_running_statistics_is_skipped(tools):
    module = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6, track_running_stats=False))
    folded, report, error = _fold_fx(module, torch.randn(4, 3, 9, 9), tools)
    record = _only_record(report, tools)
    assert record.action == "skipped" and "track_running_stats=False" in record.reason
    assert tools.count_batchnorm_nodes_fx(folded.to_torch()) == 1
    assert error < TOLERANCE


def test_onnx_bn_with_statistics_as_graph_inputs_is_skipped(tools):
    rng = np.random.default_rng(4)
    inits = {"w": rng.standard_normal((5, 3, 3, 3)).astype(np.float32)}
    inits.update({k: v for k, v in tools.bn_initializers("bn", 5, rng).items() if not k.endswith(("mean", "gamma"))})
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), tools.bn_node("bn", "c", "y")]
    model = tools.make_onnx_model(nodes, {"x": (1, 3, 8, 8), "bn.mean": (5,), "bn.gamma": (5,)}, {"y": 4}, inits)
    path = tools.save_onnx(model)
    feeds = {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32),
             "bn.mean": rng.standard_normal(5).astype(np.float32),
             "bn.gamma": rng.uniform(0.5, 1.5, 5).astype(np.float32)}
    _, report, error, saved = _fold_onnx(path, tools, feeds=feeds)
    record = _only_record(report, tools)
    assert record.action == "skipped" and "graph inputs" in record.reason
    assert tools.count_batchnorm_nodes_onnx(saved) == 1 and error < TOLERANCE


def test_onnx_matmul_on_3d_input_then_bn_is_skipped(tools):
    # MatMul over the last axis of (N, T, F), BN over axis 1 (T): not the linear's features
    rng = np.random.default_rng(5)
    inits = {"W": rng.standard_normal((6, 4)).astype(np.float32), **tools.bn_initializers("bn", 5, rng)}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="matmul"), tools.bn_node("bn", "m", "y")]
    path = tools.save_onnx(tools.make_onnx_model(nodes, {"x": (2, 5, 6)}, {"y": (2, 5, 4)}, inits))
    _, report, error, saved = _fold_onnx(path, tools)
    record = _only_record(report, tools)
    assert record.action == "skipped" and "not per-feature" in record.reason
    assert tools.count_batchnorm_nodes_onnx(saved) == 1 and error < TOLERANCE


def test_bn_before_conv_can_be_turned_off(tools):
    module = tools.randomize_batchnorms(nn.Sequential(nn.BatchNorm2d(6), nn.Conv2d(6, 8, 1)))
    folded, report, error = _fold_fx(module, torch.randn(2, 6, 5, 5), tools, "fold_bn(bn_before_conv=false)")
    record = _only_record(report, tools)
    assert record.action == "skipped" and "bn_before_conv=false" in record.reason
    assert error < TOLERANCE


# ---- the per-layer figures of the report ---------------------------------------------------------
def test_per_layer_error_and_costs_match_an_independent_computation(tools):
    conv, bn = nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6)
    module = tools.randomize_batchnorms(nn.Sequential(conv, bn)).eval()
    calibration = [torch.randn(2, 4, 9, 9) for _ in range(3)]
    graph = tf.capture(module, calibration[0])
    folded, report = tf.compress(graph, "fold_bn", calibration=calibration)
    record = tools.fold_bn_records(report, "folded")[0]
    folded_conv = folded.layers()[0].spec

    pairs = []
    for x in calibration:
        x64 = x.double()
        with torch.no_grad():
            reference = torch.nn.functional.batch_norm(
                torch.nn.functional.conv2d(x64, conv.weight.double(), conv.bias.double(), 2, 1),
                bn.running_mean.double(), bn.running_var.double(), bn.weight.double(), bn.bias.double(), eps=bn.eps)
            value = torch.nn.functional.conv2d(x64, torch.from_numpy(folded_conv.weight).double(),
                                               torch.from_numpy(folded_conv.bias).double(), 2, 1)
        pairs.append((reference.numpy(), value.numpy()))
    expected = tools.pooled_relative_error(pairs)
    assert 0 < record.error_calibration < 1e-6
    assert record.error_calibration == pytest.approx(expected, rel=1e-3)

    out_area = 5 * 5 * 2  # batch 2, 9x9 -> 5x5 at stride 2
    assert record.params_before == 6 * 4 * 9 + 6 + 4 * 6 and record.params_after == 6 * 4 * 9 + 6
    assert record.flops_before == 2 * out_area * 6 * 4 * 9 + 2 * out_area * 6
    assert record.flops_after == 2 * out_area * 6 * 4 * 9
