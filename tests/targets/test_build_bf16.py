"""bf16 convs on AMX-BF16 tiles (targets/bf16.py, int8/amx.py with AMX_BF16): the tile order, the kernel's sums,
the build's convs and its reported error, and the clear errors where bf16 cannot be built."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from torch import nn

import tensorfold as tf
from tensorfold.ir.errors import BuildError
from tensorfold.targets import get_target
from tensorfold.targets.int8.amx import AMX_BF16, BF16_FEATURES, target_has_amx, tile_kernel

HOST_BF16 = target_has_amx(get_target("x86").tvm_target, BF16_FEATURES)
needs_amx_bf16 = pytest.mark.skipif(not HOST_BF16, reason="this CPU has no AMX-BF16 (or Linux does not grant AMX)")


def test_the_bf16_tile_order_pairs_two_input_channels_per_output_column():
    weight = np.arange(32 * 40 * 3 * 3, dtype=np.float32).reshape(32, 40, 3, 3)
    tiles = tile_kernel(weight, AMX_BF16)
    assert tiles.shape == (2, 2, 3, 3, 16, 32)  # 40 inputs padded to 64
    rng = np.random.default_rng(0)
    for _ in range(50):
        o, c, ky, kx = rng.integers(32), rng.integers(40), rng.integers(3), rng.integers(3)
        # row: input pair c % 32 // 2; column: output o % 16, then c % 2
        assert tiles[o // 16, c // 32, ky, kx, c % 32 // 2, o % 16 * 2 + c % 2] == weight[o, c, ky, kx]
    assert not tiles[:, 1, ..., 4:, :].any()  # the padded inputs 40..63 carry zero weights


def _bf16(array: np.ndarray) -> np.ndarray:
    return array.astype(ml_dtypes.bfloat16).astype(np.float32)


@needs_amx_bf16
def test_the_kernel_sums_bf16_products_in_fp32():
    import tvm

    from tensorfold.targets.int8.amx import conv2d_primfunc

    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 64, 12, 10)).astype(np.float32)
    w = rng.standard_normal((32, 64, 3, 3)).astype(np.float32)
    data = np.ascontiguousarray(x.astype(ml_dtypes.bfloat16).reshape(1, 2, 32, 12, 10).transpose(0, 1, 3, 4, 2))
    tiles = tile_kernel(w.astype(ml_dtypes.bfloat16), AMX_BF16)
    func = conv2d_primfunc(data.shape, tiles.shape, (1, 1), (1, 1), AMX_BF16)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      target=tvm.target.Target(get_target("x86").tvm_target))
    out = tvm.runtime.tensor(np.zeros((1, 2, 10, 8, 16), np.float32))
    lib["main"](tvm.runtime.tensor(data), tvm.runtime.tensor(tiles), out)
    got = out.numpy().transpose(0, 1, 4, 2, 3).reshape(1, 32, 10, 8)
    want = torch.nn.functional.conv2d(torch.tensor(_bf16(x)), torch.tensor(_bf16(w))).numpy()
    # the products of bf16 values are exact in fp32; only the order of the fp32 sums differs
    assert np.allclose(got, want, rtol=1e-5, atol=1e-4)
    assert not np.allclose(got, torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(w)).numpy(), atol=1e-4)


class Block(nn.Module):
    """An RGB stem (stays fp32), a 32-channel residual block and a strided 64-channel one (bf16 on AMX),
    a depthwise conv (stays fp32) and a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.conv1 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.down = nn.Conv2d(32, 64, 1, stride=2)
        self.depthwise = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.conv1(x)) + x
        x = torch.relu(self.conv2(x) + self.down(x))
        return self.fc(torch.relu(self.depthwise(x)).mean((2, 3)))


@needs_amx_bf16
def test_a_bf16_build_runs_the_wide_convs_on_amx_and_reports_its_true_error(tmp_path):
    torch.manual_seed(0)
    model = Block().eval()
    graph = tf.capture(model, torch.randn(1, 3, 16, 20))
    artifact = tf.build(graph, "x86", tmp_path / "bf16", precision="bf16", progress=False)
    bf16 = artifact.manifest["bf16"]
    assert artifact.manifest["precision"] == "bf16"
    assert bf16["convs"] == 3 and bf16["fp32_convs"] == 2  # conv1, conv2, down; the stem and depthwise stay
    with open(artifact.library, "rb") as f:
        assert b"conv2d_NCHW32c_amx_bf16" in f.read()

    # the reported error is what the artifact gives on the inputs it names
    error = bf16["error"]
    rng, loaded = np.random.default_rng(0), artifact.load()
    worst = scale = 0.0
    for _ in range(4):
        x = rng.standard_normal((1, 3, 16, 20)).astype(np.float32)
        want = model(torch.tensor(x)).detach().numpy()
        got = next(iter(loaded.run({graph.inputs[0].name: x}).values()))
        worst, scale = max(worst, np.abs(got - want).max()), max(scale, np.abs(want).max())
    assert error["measured"] and error["max_abs"] == pytest.approx(worst, rel=1e-3, abs=1e-6)
    assert error["relative"] == pytest.approx(worst / scale, rel=1e-3, abs=1e-6)
    # bf16 rounding shows (a build that stayed fp32 would be ~1e-6), within what 8 mantissa bits allow
    assert 1e-4 < error["relative"] < 2e-2

    fp32 = tf.build(graph, "x86", tmp_path / "fp32", progress=False)
    assert fp32.manifest["precision"] == "fp32" and fp32.manifest["bf16"] is None


@pytest.mark.parametrize("kwargs, target, message", [
    ({"precision": "fp16"}, "x86", "expected one of fp32, bf16"),
    ({"precision": "bf16"}, "x86:znver4", "needs AMX-BF16"),
    ({"precision": "bf16"}, "arm64", "needs AMX-BF16"),
    ({"precision": "bf16", "float_network": "nchw"}, "x86", "blocked layout"),
])
def test_bf16_where_it_cannot_be_built_is_a_clear_error_and_writes_nothing(tmp_path, kwargs, target, message):
    graph = tf.capture(Block().eval(), torch.randn(1, 3, 16, 20))
    out = tmp_path / "out"
    with pytest.raises(BuildError, match=message):
        tf.build(graph, target, out, progress=False, **kwargs)
    assert not out.exists()


@needs_amx_bf16  # elsewhere the missing AMX-BF16 is the error, before the graph is read
def test_bf16_of_a_quantized_graph_is_a_clear_error(tmp_path):
    torch.manual_seed(0)
    graph = tf.capture(Block().eval(), torch.randn(1, 3, 16, 20))
    calibration = [{graph.inputs[0].name: np.random.default_rng(i).standard_normal((1, 3, 16, 20)).astype(np.float32)}
                   for i in range(2)]
    quantized, _ = tf.compress(graph, "int8", calibration=calibration)
    out = tmp_path / "out"
    with pytest.raises(BuildError, match="quantized"):
        tf.build(quantized, "x86", out, precision="bf16", progress=False)
    assert not out.exists()
