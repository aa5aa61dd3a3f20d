"""The torch.fx adapter: what it reads, how it runs, what a replacement does, what it writes."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import tensorfold as tf
from tensorfold.ir import GRAPH_OUTPUT, FxGraph
from tensorfold.ir.errors import ExportError, InputShapeError
from tensorfold.ir.fx_graph import conv_padding
from tensorfold.ir.specs import BatchNorm, Conv, Linear


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=1)
        self.bn = nn.BatchNorm2d(8, eps=1e-3)
        self.dw = nn.Conv2d(8, 8, 3, padding="same", groups=8, bias=False)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(self.dw(y).mean((2, 3)))


@pytest.fixture
def net(tools):
    torch.manual_seed(0)
    return tools.randomize_batchnorms(_Net()).eval()


@pytest.fixture
def example():
    return torch.randn(2, 3, 12, 10)


def test_layers_are_read_with_their_specs(net, example):
    graph = tf.capture(net, example)
    layers = graph.layers()
    assert [(l.name, l.kind) for l in layers] == [("conv", "conv"), ("bn", "batchnorm"), ("dw", "conv"),
                                                  ("fc", "linear")]
    conv, bn, dw, fc = (l.spec for l in layers)
    assert isinstance(conv, Conv) and conv.stride == (2, 1) and conv.dilation == (1, 2)
    assert conv.padding == ((1, 1), (2, 2)) and conv.groups == 1
    np.testing.assert_array_equal(conv.weight, net.conv.weight.detach().numpy())
    np.testing.assert_array_equal(conv.bias, net.conv.bias.detach().numpy())
    assert isinstance(bn, BatchNorm) and bn.eps == pytest.approx(1e-3)
    np.testing.assert_array_equal(bn.mean, net.bn.running_mean.numpy())
    np.testing.assert_array_equal(bn.var, net.bn.running_var.numpy())
    np.testing.assert_array_equal(bn.gamma, net.bn.weight.detach().numpy())
    assert dw.is_depthwise and dw.bias is None and dw.padding == ((1, 1), (1, 1))
    assert isinstance(fc, Linear) and fc.weight.shape == (4, 8)
    # shapes come from running the example input
    assert layers[0].in_shape == (2, 3, 12, 10) and layers[0].out_shape == (2, 8, 6, 6)
    assert layers[3].in_shape == (2, 8) and layers[3].out_shape == (2, 4)
    assert graph.inputs[0].shape == (2, 3, 12, 10) and graph.inputs[0].dtype == "float32"
    assert graph.output_names == ["output0"]


def test_spec_reads_do_not_alias_the_module(net, example):
    graph = tf.capture(net, example)
    graph.layers()[0].spec.weight[...] = 0
    assert net.conv.weight.abs().sum() > 0


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("kernel, dilation, expected", [
    ((4,), (1,), ((1, 2),)),          # even kernel: torch puts the extra pixel at the end
    ((3, 4), (2, 1), ((2, 2), (1, 2))),
    ((2, 2), (3, 3), ((1, 2), (1, 2))),
])
def test_same_padding_is_read_as_torch_pads_it(kernel, dilation, expected):
    assert conv_padding("same", kernel, dilation) == expected
    # and torch agrees: padding by hand, then an unpadded conv, equals padding="same"
    conv_class, conv_function = (nn.Conv1d, F.conv1d) if len(kernel) == 1 else (nn.Conv2d, F.conv2d)
    conv = conv_class(2, 3, kernel, padding="same", dilation=dilation)
    x = torch.randn((1, 2) + (9,) * len(kernel))
    flat = [p for begin_end in reversed(expected) for p in begin_end]
    with torch.no_grad():
        torch.testing.assert_close(conv(x), conv_function(F.pad(x, flat), conv.weight, conv.bias, dilation=dilation))


def test_run_returns_outputs_and_recorded_tensors(net, example):
    graph = tf.capture(net, example)
    seen = {}

    def hook(module, args, out):
        seen["bn"] = out.detach().numpy().copy()

    net.bn.register_forward_hook(hook)
    with torch.no_grad():
        expected = net(example).numpy()
    bn_output = graph.layer("bn").output
    values = graph.run({graph.inputs[0].name: example.numpy()}, record=[bn_output])
    np.testing.assert_allclose(values["output0"], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(values[bn_output], seen["bn"], rtol=1e-6, atol=1e-6)


def test_run_rejects_wrong_inputs(net, example):
    graph = tf.capture(net, example)
    name = graph.inputs[0].name
    with pytest.raises(InputShapeError, match=name):
        graph.run({name: np.zeros((2, 3, 12, 11), np.float32)})
    with pytest.raises(InputShapeError, match="missing"):
        graph.run({})
    # the batch axis may differ
    assert graph.run({name: np.zeros((5, 3, 12, 10), np.float32)})["output0"].shape == (5, 4)


def test_consumers_and_producer(net, example):
    graph = tf.capture(net, example)
    conv = graph.layer("conv")
    assert graph.consumers(conv.output) == [graph.layer("bn").facts["node"]]
    assert graph.producer(graph.layer("bn").input).name == "conv"
    fc = graph.layer("fc")
    assert graph.consumers(fc.output) == [GRAPH_OUTPUT]
    assert graph.unknown_ops() == []


def test_total_params_counts_weights_and_bn_statistics(net, example):
    graph = tf.capture(net, example)
    expected = sum(p.numel() for p in net.parameters()) + 2 * net.bn.num_features  # + running mean and var
    assert graph.total_params() == expected
    assert graph.layer_cost().params == expected


def test_replace_with_the_same_spec_keeps_the_outputs(net, example):
    graph = tf.capture(net, example)
    copy_ = graph.copy()
    copy_.replace(["dw"], [graph.layer("dw").spec])
    feed = {graph.inputs[0].name: example.numpy()}
    np.testing.assert_allclose(copy_.run(feed)["output0"], graph.run(feed)["output0"], rtol=1e-6, atol=1e-6)


def test_replace_a_chain_and_the_original_is_untouched(net, example, tools):
    graph = tf.capture(net, example)
    feed = graph.random_inputs(1)
    before = graph.run(feed)["output0"]
    rng = np.random.default_rng(0)
    conv = graph.layer("conv").spec
    # an asymmetric padding becomes ConstantPad + conv in torch
    first = Conv(conv.weight[:, :, :, 1:4].copy(), None, conv.stride, ((0, 2), (1, 0)), (1, 1), 1)
    second = Conv(rng.standard_normal((8, 8, 1, 1)).astype(np.float32), rng.standard_normal(8).astype(np.float32))
    edited = graph.copy()
    edited.replace(["conv", "bn"], [first, second])

    layers = edited.layers()
    assert [l.kind for l in layers] == ["conv", "conv", "conv", "linear"], "every new layer is listed"
    np.testing.assert_array_equal(layers[0].spec.weight, first.weight)
    np.testing.assert_array_equal(layers[1].spec.weight, second.weight)
    assert layers[0].in_shape[2:] == (14, 11), "the conv reads the zero-padded input"
    assert layers[1].out_shape == (2, 8, 6, 9)

    x = torch.from_numpy(feed[graph.inputs[0].name])
    with torch.no_grad():
        y = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 0, 0, 2)), torch.from_numpy(first.weight),
                                       stride=(2, 1))
        y = torch.nn.functional.conv2d(y, torch.from_numpy(second.weight), torch.from_numpy(second.bias))
        expected = net.fc(net.dw(torch.relu(y)).mean((2, 3))).numpy()
    assert tools.relative_error(expected, edited.run(feed)["output0"]) < 1e-5
    # the input graph is unchanged
    np.testing.assert_array_equal(graph.run(feed)["output0"], before)
    assert [l.name for l in graph.layers()] == ["conv", "bn", "dw", "fc"]


def test_capture_keeps_the_users_module(example):
    module = _Net().train()
    state = copy.deepcopy(module.state_dict())
    graph = tf.capture(module, example)
    assert graph.training and module.training
    assert not graph.to_torch().training  # the graph runs in inference mode
    for key, value in module.state_dict().items():
        assert torch.equal(value, state[key])
    module.conv.weight.data.zero_()
    assert np.abs(graph.layer("conv").spec.weight).sum() > 0, "the graph holds its own copy of the weights"


class _NeedsExport(nn.Module):
    """fx cannot trace the shape test; torch.export can (shapes are static)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        if x.shape[-1] > 4:
            x = x * 2
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def test_torch_export_fallback_reads_aten_layers_and_folds(tools):
    module = tools.randomize_batchnorms(_NeedsExport()).eval()
    x = torch.randn(1, 3, 8, 8)
    graph = tf.capture(module, x)
    assert [l.kind for l in graph.layers()] == ["conv", "batchnorm", "linear"]
    assert all(l.spec is not None for l in graph.layers())
    np.testing.assert_array_equal(graph.layers()[1].spec.mean, module.bn.running_mean.numpy())
    folded, report = tf.compress(graph, "fold_bn")
    assert [r.action for r in report.passes[0].records] == ["folded"]
    assert tools.count_batchnorm_nodes_fx(folded.to_torch()) == 0
    assert tools.relative_error(tools.torch_output(module, x), tools.torch_output(folded.to_torch(), x)) < 1e-5


@pytest.mark.parametrize("suffix", [".onnx", ".pt2", ".pt"])
def test_save(suffix, net, example, tmp_path, tools):
    graph = tf.capture(net, example)
    path = tmp_path / f"model{suffix}"
    graph.save(str(path))
    assert path.stat().st_size > 0
    with torch.no_grad():
        expected = net(example).numpy()
    if suffix == ".onnx":
        onnx.checker.check_model(onnx.load(str(path)))
        (got,) = tools.run_onnxruntime(str(path), {graph.inputs[0].name: example.numpy()})
    elif suffix == ".pt2":
        got = torch.export.load(str(path)).module()(example).detach().numpy()
    else:
        got = torch.load(str(path), weights_only=False)(example).detach().numpy()
    assert tools.relative_error(expected, got) < 1e-5


def test_save_with_an_unknown_suffix_is_an_export_error(net, example, tmp_path):
    with pytest.raises(ExportError, match="model.txt"):
        tf.capture(net, example).save(str(tmp_path / "model.txt"))


def test_fx_graph_is_a_graph():
    assert issubclass(FxGraph, tf.Graph)
