"""int8 convs on Intel AMX tiles (targets/int8/amx.py): the tile order, the kernel's sums, the lowering's choice."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tensorfold as tf
from tensorfold.targets.int8.amx import host_amx_mattr, rows_per_tile, tile_kernel

HOST_AMX = bool(host_amx_mattr())
needs_amx = pytest.mark.skipif(not HOST_AMX, reason="this CPU (or its kernel) offers no AMX int8 tiles")


def _conv_reference(x: np.ndarray, w: np.ndarray, stride: int) -> np.ndarray:
    return torch.nn.functional.conv2d(torch.tensor(x, dtype=torch.float64), torch.tensor(w, dtype=torch.float64),
                                      stride=stride).numpy().astype(np.int64)


def _blocked(x: np.ndarray) -> np.ndarray:
    """NCHW u8 -> NCHW64c, zero-padded channels."""
    n, c, h, w = x.shape
    padded = np.zeros((n, -(-c // 64) * 64, h, w), x.dtype)
    padded[:, :c] = x
    return np.ascontiguousarray(padded.reshape(n, -1, 64, h, w).transpose(0, 1, 3, 4, 2))


def _tdpbusd_conv(data: np.ndarray, tiles: np.ndarray, stride: int) -> np.ndarray:
    """What the kernel computes, tile by tile as `tdpbusd` defines it:
    C[m, n] += sum_k A[m, 4k:4k+4] . B[k, 4n:4n+4], A a row of 64 input channels per pixel, B one tile."""
    n_, _, height, width, _ = data.shape
    ob, cb, kh, kw, _, _ = tiles.shape
    out_h, out_w = (height - kh) // stride + 1, (width - kw) // stride + 1
    out = np.zeros((n_, ob * 16, out_h, out_w), np.int64)
    for o in range(ob):
        for c in range(cb):
            for y in range(kh):
                for x in range(kw):
                    a = data[:, c, y:y + stride * out_h:stride, x:x + stride * out_w:stride, :].astype(np.int64)
                    b = tiles[o, c, y, x].reshape(16, 16, 4).astype(np.int64)   # [k][n][i]
                    out[:, o * 16:(o + 1) * 16] += np.einsum("bhwki,kni->bnhw", a.reshape(*a.shape[:3], 16, 4), b)
    return out


@pytest.mark.parametrize(("c_in", "c_out", "k", "stride"), [(64, 32, 3, 1), (96, 20, 3, 2), (130, 16, 1, 1)])
def test_tile_order_is_the_one_tdpbusd_multiplies(c_in, c_out, k, stride):
    # any CPU: the weights' tile order and the data's 64-channel blocks give the conv's sums
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (1, c_in, 9, 10), dtype=np.uint8)
    w = rng.integers(-128, 128, (c_out, c_in, k, k), dtype=np.int8)
    got = _tdpbusd_conv(_blocked(x), tile_kernel(w), stride)
    assert np.array_equal(got[:, :c_out], _conv_reference(x, w, stride))
    assert not got[:, c_out:].any()  # padded output channels meet zero weights


def test_a_tile_never_crosses_an_output_row():
    assert [rows_per_tile(w) for w in (112, 56, 28, 14, 7, 17, 1)] == [16, 14, 14, 14, 7, 1, 1]


def _run_primfunc(x: np.ndarray, w: np.ndarray, stride: int) -> np.ndarray:
    import tvm

    from tensorfold.targets import get_target
    from tensorfold.targets.int8.amx import conv2d_primfunc

    data, tiles = _blocked(x), tile_kernel(w)
    func = conv2d_primfunc(data.shape, tiles.shape, (stride, stride), (1, 1))
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=get_target("x86").tvm())
    out_h, out_w = (x.shape[2] - w.shape[2]) // stride + 1, (x.shape[3] - w.shape[3]) // stride + 1
    out = tvm.runtime.tensor(np.zeros((1, tiles.shape[0], out_h, out_w, 16), np.int32))
    lib["main"](tvm.runtime.tensor(data), tvm.runtime.tensor(tiles), out)
    return out.numpy().transpose(0, 1, 4, 2, 3).reshape(1, -1, out_h, out_w)[:, :w.shape[0]]


@needs_amx
@pytest.mark.parametrize(("c_in", "c_out", "size", "k", "stride"), [
    (64, 64, 18, 3, 1),     # 2 x 2 tiles per unit (16 pixels x 2 blocks of 16 outputs)
    (128, 48, 9, 3, 2),     # odd output-channel blocks: one B tile per unit; 4-pixel rows
    (96, 32, 9, 3, 1),      # input channels padded to 128; 7-pixel rows, 7 blocks: one A tile per unit
    (256, 64, 14, 1, 2),    # strided 1x1
])
def test_amx_kernel_sums_exactly_what_the_conv_sums(c_in, c_out, size, k, stride):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (1, c_in, size, size), dtype=np.uint8)
    w = rng.integers(-128, 128, (c_out, c_in, k, k), dtype=np.int8)
    assert np.array_equal(_run_primfunc(x, w, stride), _conv_reference(x, w, stride))


class Wide(nn.Module):
    """A 3-channel stem (stays on VNNI) and convs with >= 64 inputs (AMX), strided, 1x1, padded channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, padding=1)
        self.down = nn.Conv2d(64, 96, 3, stride=2, padding=1)
        self.point = nn.Conv2d(96, 80, 1)
        self.fc = nn.Linear(80, 10)

    def forward(self, x):
        x = torch.relu(self.point(torch.relu(self.down(torch.relu(self.stem(x))))))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def wide_int8():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    calibration = [rng.uniform(-1, 1, (8, 3, 20, 20)).astype(np.float32)]
    graph, _ = tf.compress(tf.capture(Wide().eval(), torch.zeros(1, 3, 20, 20)), "int8", calibration=calibration)
    return graph


def test_convs_with_64_inputs_or_more_go_to_amx_where_the_target_has_it(wide_int8, tmp_path):
    # compile only: a Sapphire Rapids target builds on any x86 machine
    built = tf.build(wide_int8, "x86:sapphirerapids", tmp_path / "spr", progress=False)
    lowering = built.manifest["int8"]
    assert lowering["dot_product"] == "tdpbusd + vpdpbusd"
    assert sum("in NCHW64c (tdpbusd)" in op for op in lowering["int8_ops"]) == 2, lowering["int8_ops"]
    assert sum("(vpdpbusd)" in op for op in lowering["int8_ops"]) == 2  # the stem and the classifier
    assert sum(k.startswith("conv2d_NCHW64c_amx") for k in lowering["tensorized_kernels"]) == 2
    assert sum(k.startswith("conv2d_NCHW64c_amx") for k in lowering["int8_kernels"]) == 2
    assert lowering["machine_instructions"]["instructions"].get("tdpbusd", 0) > 0
    # the fixed kernel is no tuning task
    assert not any("amx" in task for task in built.manifest["tuning"]["tasks"])
    plain = tf.build(wide_int8, "x86:icelake-server", tmp_path / "icx", progress=False).manifest["int8"]
    assert plain["dot_product"] == "vpdpbusd" and not any("NCHW64c" in op for op in plain["int8_ops"])
    # the default network: blocked with AMX (its conv is fixed: the transposes around it cost the most) and
    # with VNNI (measured on a Zen 4, README); per-conv with AVX2's s16 pairs
    avx2 = tf.build(wide_int8, "x86:haswell", tmp_path / "hsw", progress=False).manifest["int8"]
    assert avx2["dot_product"] == "vpmaddwd"
    assert (lowering["network"], plain["network"], avx2["network"]) == ("blocked", "blocked", "per-conv")


@needs_amx
def test_amx_build_gives_the_vnni_build_s_outputs(wide_int8, tmp_path):
    from tensorfold.targets import get_target, load_artifact

    assert "+amx-int8" in get_target("x86").tvm_target.get("mattr", []) or "sapphirerapids" in str(
        get_target("x86").tvm_target.get("mcpu"))
    amx = tf.build(wide_int8, "x86", tmp_path / "amx", progress=False, int8_network="per-conv")
    vnni = tf.build(wide_int8, "x86:icelake-server", tmp_path / "vnni", progress=False, int8_network="per-conv")
    assert "tdpbusd" in amx.manifest["int8"]["dot_product"]
    x = np.random.default_rng(2).uniform(-1, 1, (1, 3, 20, 20)).astype(np.float32)
    outputs = [next(iter(load_artifact(b.path)(x).values())) for b in (amx, vnni)]
    assert np.array_equal(outputs[0], outputs[1])  # the same integer sums, the same float epilogue


def test_blocked_network_re_blocks_sixteen_lane_outputs_into_amx_blocks(wide_int8, tmp_path):
    # compile only: between convs the activations stay blocked; NCHW16c -> NCHW64c is a re-blocking, not a
    # round trip through NCHW (one change into the blocked layout at the stem, one out at the classifier)
    built = tf.build(wide_int8, "x86:sapphirerapids", tmp_path / "spr", progress=False, int8_network="blocked")
    lowering = built.manifest["int8"]
    assert sum("in NCHW64c (tdpbusd), fixed-point" in op for op in lowering["int8_ops"]) == 2, lowering["int8_ops"]
    assert lowering["layout_changes"] == {"to_blocked": 1, "from_blocked": 1, "reblock": 2}


@needs_amx
def test_blocked_amx_network_gives_the_blocked_vnni_network_s_outputs(wide_int8, tmp_path):
    from tensorfold.targets import load_artifact

    amx = tf.build(wide_int8, "x86", tmp_path / "amx", progress=False, int8_network="blocked")
    vnni = tf.build(wide_int8, "x86:icelake-server", tmp_path / "vnni", progress=False, int8_network="blocked")
    x = np.random.default_rng(3).uniform(-1, 1, (1, 3, 20, 20)).astype(np.float32)
    outputs = [next(iter(load_artifact(b.path)(x).values())) for b in (amx, vnni)]
    assert np.array_equal(outputs[0], outputs[1])
