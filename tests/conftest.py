"""Shared fixtures: models with non-trivial batch-norm statistics, ONNX files, independent checks.

Helpers are handed out as fixtures (no imports between test files: the suite has no
`__init__.py` files). Every check here is computed independently of tensorfold's own
measuring code, so a test compares tensorfold's figures against ours, not against itself.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn


def randomize_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch norm random running mean/var, gamma and beta (in place; returns the model).

    Fresh torchvision models have mean 0, var 1, gamma 1, beta 0: folding those is
    (almost) the identity, so a fold test on them tests nothing.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, nn.modules.batchnorm._BatchNorm):
                continue
            c = module.num_features
            if module.running_mean is not None:
                module.running_mean.copy_(torch.randn(c, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.25)
            if module.affine:
                module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(c, generator=generator) * 0.3)
    return model


def relative_error(reference: np.ndarray, value: np.ndarray) -> float:
    """||a - b|| / ||a|| in float64, written here so tests do not check tensorfold with itself."""
    reference = np.asarray(reference, np.float64)
    return float(np.linalg.norm(reference - np.asarray(value, np.float64)) / np.linalg.norm(reference))


def pooled_relative_error(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
    num = sum(float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)) for a, b in pairs)
    den = sum(float(np.sum(np.asarray(a, np.float64) ** 2)) for a, _ in pairs)
    return float(np.sqrt(num / den))


def torch_output(module: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return module(x).detach().numpy()


def count_batchnorm_nodes_fx(gm: torch.fx.GraphModule) -> int:
    """Batch norms left in an FX graph, counted from the graph itself (not from `layers()`)."""
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_module":
            sub = gm.get_submodule(node.target)
            count += sum(isinstance(m, nn.modules.batchnorm._BatchNorm) or type(m).__name__ == "BatchNormModule"
                         for m in sub.modules())
        elif node.op == "call_function" and "batch_norm" in str(node.target):
            count += 1
    return count


def count_batchnorm_nodes_onnx(model: onnx.ModelProto) -> int:
    return sum(node.op_type == "BatchNormalization" for node in model.graph.node)


def export_to_onnx(model: nn.Module, example: torch.Tensor, path: str | os.PathLike) -> str:
    """torch -> ONNX that keeps its BatchNormalization nodes (constant folding would fold them: docs/toolchain.md#onnx-export)."""
    torch.onnx.export(model.eval(), (example,), os.fspath(path), dynamo=False, do_constant_folding=False,
                      input_names=["input"], output_names=["output"], opset_version=17)
    return os.fspath(path)


def make_onnx_model(nodes: list, inputs: dict[str, Sequence], outputs: dict[str, Sequence | int],
                    initializers: dict[str, np.ndarray], opsets: dict[str, int] | None = None) -> onnx.ModelProto:
    """A small float32 ONNX model from onnx.helper nodes, checked by onnx.checker.

    A shape is a sequence of ints or dim names; an output shape may be an int, its rank (dims unknown).
    """
    def value_info(name, shape):
        dims = [None] * shape if isinstance(shape, int) else list(shape)
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)

    graph = helper.make_graph(
        nodes, "test", [value_info(name, shape) for name, shape in inputs.items()],
        [value_info(name, shape) for name, shape in outputs.items()],
        [numpy_helper.from_array(np.asarray(value), name) for name, value in initializers.items()])
    opsets = {"": 17, **(opsets or {})}
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def wild_onnx_model(opset: int = 12, seed: int = 0) -> onnx.ModelProto:
    """A small CNN as other converters (paddle2onnx, tf2onnx) write them, not as torch.onnx.export does.

    Old opset; weights partly in `Constant` nodes; symbolic batch/height/width; the flatten is a
    `Shape -> Gather -> Unsqueeze -> Concat -> Reshape` subgraph; an SE block gated by HardSigmoid;
    a BatchNormalization to fold; a MatMul head with its weight on the right (+ Add bias) and
    one with its weight on the left (a token mixer). Outputs: logits (N, 10) and tokens (N, 4, 8).
    """
    rng = np.random.default_rng(seed)

    def w(*shape, scale=0.3):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def constant(name, value):
        return helper.make_node("Constant", [], [name], name=f"const_{name}",
                                value=numpy_helper.from_array(np.asarray(value), name))

    def unsqueeze(x, y, axes):
        if opset >= 13:
            return [constant(f"{y}_axes", np.array(axes, np.int64)), helper.make_node("Unsqueeze", [x, f"{y}_axes"], [y])]
        return [helper.make_node("Unsqueeze", [x], [y], axes=axes)]

    nodes = [
        constant("conv1.w", w(8, 3, 3, 3)), constant("conv1.b", w(8)),
        helper.make_node("Conv", ["x", "conv1.w", "conv1.b"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]),
        bn_node("bn1", "c1", "b1"),
        helper.make_node("Relu", ["b1"], ["r1"]),
        # squeeze-and-excitation, gated by a hard sigmoid (MobileNet-v3 style)
        helper.make_node("GlobalAveragePool", ["r1"], ["se_pool"]),
        helper.make_node("Conv", ["se_pool", "se1.w", "se1.b"], ["se1"], name="se_reduce"),
        helper.make_node("Relu", ["se1"], ["se1r"]),
        helper.make_node("Conv", ["se1r", "se2.w", "se2.b"], ["se2"], name="se_expand"),
        helper.make_node("HardSigmoid", ["se2"], ["gate"], alpha=0.2, beta=0.5),
        helper.make_node("Mul", ["r1", "gate"], ["se_out"]),
        constant("conv2.w", w(16, 8, 3, 3, scale=0.2)),
        helper.make_node("Conv", ["se_out", "conv2.w", "conv2.b"], ["c2"], name="conv2", pads=[1, 1, 1, 1],
                         strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        # flatten through a shape subgraph: (N, 16, 1, 1) -> Reshape(to [N, -1])
        helper.make_node("GlobalAveragePool", ["r2"], ["pool"]),
        helper.make_node("Shape", ["pool"], ["pool_shape"]),
        constant("zero", np.array(0, np.int64)),
        helper.make_node("Gather", ["pool_shape", "zero"], ["batch"], axis=0),
        *unsqueeze("batch", "batch1", [0]),
        constant("minus_one", np.array([-1], np.int64)),
        helper.make_node("Concat", ["batch1", "minus_one"], ["flat_shape"], axis=0),
        helper.make_node("Reshape", ["pool", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fc.w"], ["fc"], name="fc"),
        helper.make_node("Add", ["fc", "fc.b"], ["logits"]),
        # tokens (N, 16, 8): a fixed-size pooling, then a MatMul with the weight on the left
        helper.make_node("AveragePool", ["r2"], ["tok_pool"], kernel_shape=[1, 1], strides=[1, 1]),
        helper.make_node("Shape", ["r2"], ["r2_shape"]),
        constant("first_two", np.array([0, 1], np.int64)),
        helper.make_node("Gather", ["r2_shape", "first_two"], ["nc"], axis=0),
        constant("eight", np.array([8], np.int64)),
        helper.make_node("Concat", ["nc", "eight", "minus_one"], ["tok_shape"], axis=0),
        helper.make_node("Reshape", ["tok_pool", "tok_shape"], ["tok4"]),
        helper.make_node("ReduceMean", ["tok4"], ["tok"], axes=[3], keepdims=0),
        helper.make_node("MatMul", ["mix.w", "tok"], ["tokens"], name="token_mixer"),
    ]
    initializers = {"se1.w": w(4, 8, 1, 1), "se1.b": w(4), "se2.w": w(8, 4, 1, 1), "se2.b": w(8),
                    "conv2.b": w(16), "fc.w": w(16, 10), "fc.b": w(10), "mix.w": w(4, 16),
                    **bn_initializers("bn1", 8, rng)}
    return make_onnx_model(nodes, {"x": ["N", 3, "H", "W"]}, {"logits": ["N", 10], "tokens": 3}, initializers,
                           opsets={"": opset})


def bn_initializers(prefix: str, channels: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """gamma, beta, mean, var of a non-trivial batch norm, as named initializers."""
    return {f"{prefix}.gamma": rng.uniform(0.5, 1.5, channels).astype(np.float32),
            f"{prefix}.beta": (rng.standard_normal(channels) * 0.3).astype(np.float32),
            f"{prefix}.mean": (rng.standard_normal(channels) * 0.5).astype(np.float32),
            f"{prefix}.var": rng.uniform(0.25, 1.75, channels).astype(np.float32)}


def bn_node(prefix: str, x: str, y: str, epsilon: float = 1e-5) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x] + [f"{prefix}.{k}" for k in ("gamma", "beta", "mean", "var")],
                            [y], name=prefix, epsilon=epsilon)


def fold_bn_records(report, action: str | None = None) -> list:
    """The fold_bn records of a pipeline report, optionally only those with `action`."""
    records = [r for p in report.passes if p.name == "fold_bn" for r in p.records]
    return [r for r in records if action is None or r.action == action]


def run_onnxruntime(path_or_model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a file or model in a fresh onnxruntime session (not through tensorfold)."""
    import onnxruntime as ort

    source = (os.fspath(path_or_model) if isinstance(path_or_model, (str, os.PathLike))
              else path_or_model.SerializeToString())
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


class Tools:
    """The helpers above, as one fixture: `def test_x(tools): tools.relative_error(a, b)`."""

    randomize_batchnorms = staticmethod(randomize_batchnorms)
    relative_error = staticmethod(relative_error)
    pooled_relative_error = staticmethod(pooled_relative_error)
    torch_output = staticmethod(torch_output)
    count_batchnorm_nodes_fx = staticmethod(count_batchnorm_nodes_fx)
    count_batchnorm_nodes_onnx = staticmethod(count_batchnorm_nodes_onnx)
    make_onnx_model = staticmethod(make_onnx_model)
    bn_initializers = staticmethod(bn_initializers)
    bn_node = staticmethod(bn_node)
    run_onnxruntime = staticmethod(run_onnxruntime)
    fold_bn_records = staticmethod(fold_bn_records)
    wild_onnx_model = staticmethod(wild_onnx_model)

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path

    def export_to_onnx(self, model: nn.Module, example: torch.Tensor, name: str = "model.onnx") -> str:
        return export_to_onnx(model, example, self.tmp_path / name)

    def save_onnx(self, model: onnx.ModelProto, name: str = "model.onnx") -> str:
        path = os.fspath(self.tmp_path / name)
        onnx.save(model, path)
        return path


@pytest.fixture
def tools(tmp_path) -> Tools:
    return Tools(tmp_path)


@pytest.fixture(scope="session", autouse=True)
def _session_tuning_database(tmp_path_factory):
    """Builds that name no --tuning-db tune into one database of this test run, not the user's:
    a developer's records neither leak into the tests nor get written (or broken) by them."""
    previous = os.environ.get("TENSORFOLD_TUNING_DIR")
    os.environ["TENSORFOLD_TUNING_DIR"] = str(tmp_path_factory.mktemp("tuning-databases"))
    yield
    if previous is None:
        del os.environ["TENSORFOLD_TUNING_DIR"]
    else:
        os.environ["TENSORFOLD_TUNING_DIR"] = previous


@pytest.fixture(autouse=True)
def _seeded_torch():
    """A fixed torch seed for every test (numpy tests use their own default_rng(seed))."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def tracker():
    """A TVM RPC tracker on loopback, in its own process group, stopped after the module."""
    from tensorfold.targets import rpc

    port = rpc.free_port()
    managed = rpc.start_tracker("127.0.0.1", port)
    try:
        yield "127.0.0.1", port
    finally:
        managed.stop()
