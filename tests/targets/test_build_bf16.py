"""bf16 convs (targets/bf16.py) on AMX-BF16 tiles (int8/amx.py with AMX_BF16) or AVX512-BF16's vdpbf16ps
(tuning/intrinsics.BF16_INTRIN): the kernels' weight orders and sums, the build's convs and its reported
error, and the clear errors where bf16 cannot be built."""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import torch
from torch import nn

import tensorfold as tf
from tensorfold.ir.errors import BuildError
from tensorfold.targets import get_target
from tensorfold.targets.bf16 import AVX512, conv2d_te, pair_kernel, route_for
from tensorfold.targets.int8.amx import AMX_BF16, BF16_FEATURES, target_has_amx, tile_kernel

HOST = get_target("x86").tvm_target
HOST_ROUTE = route_for(HOST)
needs_amx_bf16 = pytest.mark.skipif(not target_has_amx(HOST, BF16_FEATURES),
                                    reason="this CPU has no AMX-BF16 (or Linux does not grant AMX)")
needs_bf16 = pytest.mark.skipif(HOST_ROUTE is None, reason="this CPU has neither AVX512-BF16 nor AMX-BF16")


def _host_has(feature: str) -> bool:
    import tvm
    from tvm.target import codegen

    return codegen.target_has_features(feature, tvm.target.Target(HOST))


needs_avx512_bf16 = pytest.mark.skipif(not _host_has("avx512bf16"), reason="this CPU has no AVX512-BF16")


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
def test_the_amx_kernel_sums_bf16_products_in_fp32():
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


def test_the_pair_order_puts_16_output_channels_of_one_input_pair_in_one_vector():
    weight = np.arange(32 * 48 * 3 * 3, dtype=np.float32).reshape(32, 48, 3, 3)
    pairs = pair_kernel(weight)
    assert pairs.shape == (2, 24, 3, 3, 16, 2)
    rng = np.random.default_rng(0)
    for _ in range(50):
        o, c, ky, kx = rng.integers(32), rng.integers(48), rng.integers(3), rng.integers(3)
        assert pairs[o // 16, c // 2, ky, kx, o % 16, c % 2] == weight[o, c, ky, kx]


@needs_avx512_bf16
def test_the_tensorized_vdpbf16ps_kernel_sums_bf16_products_in_fp32(tmp_path):
    import subprocess

    import tvm
    from tvm import s_tir, te

    from tensorfold.targets.tuning.intrinsics import BF16_INTRIN, register_avx512_bf16

    register_avx512_bf16()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 32, 9, 11)).astype(np.float32)
    w = rng.standard_normal((48, 32, 3, 3)).astype(np.float32)
    data = np.ascontiguousarray(x.astype(ml_dtypes.bfloat16).reshape(1, 2, 16, 9, 11).transpose(0, 1, 3, 4, 2))
    kernel = pair_kernel(w.astype(ml_dtypes.bfloat16))
    d = te.placeholder(data.shape, "bfloat16", name="data")
    k = te.placeholder(kernel.shape, "bfloat16", name="kernel")
    out = conv2d_te(d, k, (1, 2), (1, 1))
    sch = s_tir.Schedule(te.create_prim_func([d, k, out]))
    block = sch.get_sblock(AVX512.kernel)
    b, ob, y, x_, oi, rc, ry, rx, rp, ri = sch.get_loops(block)
    sch.reorder(b, ob, y, rc, ry, rx, rp, x_, oi, ri)
    sch.decompose_reduction(block, rc)
    sch.tensorize(oi, BF16_INTRIN)  # fails unless the compute is exactly the intrinsic's 16 x 2 dot product
    lib = tvm.compile(sch.mod, target=tvm.target.Target(HOST))
    result = tvm.runtime.tensor(np.zeros((1, 3, 7, 5, 16), np.float32))
    lib["main"](tvm.runtime.tensor(data), tvm.runtime.tensor(kernel), result)
    got = result.numpy().transpose(0, 1, 4, 2, 3).reshape(1, 48, 7, 5)
    want = torch.nn.functional.conv2d(torch.tensor(_bf16(x)), torch.tensor(_bf16(w)), stride=(1, 2)).numpy()
    assert np.allclose(got, want, rtol=1e-5, atol=1e-4)
    assert not np.allclose(got, torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(w), stride=(1, 2)).numpy(),
                           atol=1e-4)
    library = tmp_path / "kernel.so"
    lib.export_library(str(library))
    assert "vdpbf16ps" in subprocess.run(["objdump", "-d", str(library)], capture_output=True, text=True).stdout


class Block(nn.Module):
    """An RGB stem (bf16 on AVX512-BF16, fp32 on AMX), a 32-channel residual block and a strided 64-channel
    one (bf16), a depthwise conv (stays fp32) and a classifier."""

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


@needs_bf16
def test_a_bf16_build_runs_the_wide_convs_in_bf16_and_reports_its_true_error(tmp_path):
    """On this host's route: AMX's fixed kernel, or vdpbf16ps tensorized by a few tuning trials."""
    torch.manual_seed(0)
    model = Block().eval()
    graph = tf.capture(model, torch.randn(1, 3, 16, 20))
    trials = 16 if HOST_ROUTE.tuned else 0
    artifact = tf.build(graph, "x86", tmp_path / "bf16", precision="bf16", tune_trials=trials,
                        tuning_db=str(tmp_path / "db"), progress=False)
    bf16 = artifact.manifest["bf16"]
    assert artifact.manifest["precision"] == "bf16"
    assert bf16["route"] == HOST_ROUTE.name and bf16["instruction"] == HOST_ROUTE.instruction
    # conv1, conv2, down; the RGB stem too on AVX512-BF16 (a zero 4th channel), not on AMX; depthwise stays fp32
    assert (bf16["convs"], bf16["fp32_convs"]) == ((4, 1) if HOST_ROUTE is AVX512 else (3, 2))
    with open(artifact.library, "rb") as f:
        assert HOST_ROUTE.kernel.encode() in f.read()
    # the library multiplies in bf16: the census counts the route's instruction
    assert bf16["instructions"]["instructions"].get(HOST_ROUTE.instruction, 0) > 0, bf16["instructions"]
    assert "warning" not in bf16

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


@pytest.mark.skipif(HOST_ROUTE is not AVX512, reason="the untuned warning is the AVX512-BF16 route's")
def test_an_untuned_avx512_bf16_build_says_it_has_no_vdpbf16ps(tmp_path, capsys):
    from tensorfold.cli import main

    model_file = tmp_path / "block.onnx"
    tf.capture(Block().eval(), torch.randn(1, 3, 16, 20)).save(str(model_file))
    out = tmp_path / "bf16"
    assert main(["build", str(model_file), "--target", "x86", "--precision", "bf16", "-o", str(out),
                 "--tuning-db", str(tmp_path / "db"), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "4 convs in bf16 (vdpbf16ps, 0 in the library)" in printed and "warning: no vdpbf16ps" in printed
    bf16 = json.loads((out / "manifest.json").read_text())["bf16"]
    assert "vdpbf16ps" not in bf16["instructions"]["instructions"] and "not tuned" in bf16["warning"]
    assert 1e-4 < bf16["error"]["relative"] < 2e-2  # untuned, it still computes the bf16 products


@pytest.mark.parametrize("kwargs, target, message", [
    ({"precision": "fp16"}, "x86", "expected one of fp32, bf16"),
    ({"precision": "bf16"}, "x86:znver3", "AVX512-BF16"),  # AVX2 only
    ({"precision": "bf16"}, "arm64", "AVX512-BF16"),
    ({"precision": "bf16", "float_network": "nchw"}, "x86", "blocked layout"),
])
def test_bf16_where_it_cannot_be_built_is_a_clear_error_and_writes_nothing(tmp_path, kwargs, target, message):
    graph = tf.capture(Block().eval(), torch.randn(1, 3, 16, 20))
    out = tmp_path / "out"
    with pytest.raises(BuildError, match=message):
        tf.build(graph, target, out, progress=False, **kwargs)
    assert not out.exists()


@needs_bf16  # elsewhere the missing bf16 instruction is the error, before the graph is read
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
