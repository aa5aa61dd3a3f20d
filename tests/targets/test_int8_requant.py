"""Fixed-point requantization: the math against float and a numpy reference, and in the int8 lowering."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tensorfold as tf
from tensorfold.targets.int8.requant import (quantize_multiplier, requantize_float, requantize_reference,
                                             rounding_terms)


def _multipliers(rng, count):
    # tiny (deep layers with small weights), mid-range, and near 1
    return np.concatenate([10.0 ** rng.uniform(-12, -5, count), 10.0 ** rng.uniform(-5, -0.5, count),
                           rng.uniform(0.9, 1.0, count), [1e-30, 2.0 ** -31, 0.5, 0.9999999]])


def test_multiplier_is_a_31_bit_mantissa_and_a_shift():
    rng = np.random.default_rng(0)
    values = _multipliers(rng, 200)
    m, shift = quantize_multiplier(values)
    normal = m > 0
    assert np.all((m[normal] >= 2 ** 30) & (m[normal] < 2 ** 31))
    rebuilt = m * 2.0 ** (-31 - shift.astype(np.float64))
    assert np.allclose(rebuilt[normal], values[normal], rtol=2.0 ** -30, atol=0)
    # a dropped multiplier is one that sends every int32 accumulator to 0
    assert np.all(values[~normal] * 2.0 ** 31 < 0.5)
    total, rounding = rounding_terms(shift)
    assert np.all((total >= 1) & (total <= 62)) and np.all(rounding == 2 ** (total - 1))
    with pytest.raises(ValueError):
        quantize_multiplier([2.0 ** 31])


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_fixed_point_is_within_one_step_of_float_and_mostly_equal(dtype):
    rng = np.random.default_rng(1)
    values = _multipliers(rng, 40)
    m, shift = quantize_multiplier(values)
    zero = 128 if dtype == "uint8" else 3
    for multiplier, mi, si in zip(values, m, shift):
        # accumulators around the output range, and the int32 extremes
        span = min(2 ** 31 - 1, 300.0 / multiplier)
        acc = np.concatenate([rng.integers(-span, span, 2000, endpoint=True),
                              [0, 1, -1, 2 ** 31 - 1, -2 ** 31]]).astype(np.int64)
        fixed = requantize_reference(acc, mi, si, zero, dtype).astype(np.int64)
        floated = requantize_float(acc, multiplier, zero, dtype).astype(np.int64)
        assert np.max(np.abs(fixed - floated)) <= 1, multiplier
        # and equal away from ties (half up vs half to even) and M's last bit
        product = acc * multiplier
        clear = np.abs(product - np.floor(product) - 0.5) > 1e-6 * np.maximum(1.0, np.abs(product))
        assert np.array_equal(fixed[clear], floated[clear]), multiplier


def test_relax_requantization_is_bit_exact_with_the_numpy_formula():
    import tvm
    from tvm import relax

    from tensorfold.targets.int8.requant import requantize_relax

    rng = np.random.default_rng(2)
    channels = 24
    values = rng.choice(_multipliers(rng, 20), channels)
    m, shift = quantize_multiplier(values)
    acc = rng.integers(-2 ** 31, 2 ** 31 - 1, (1, channels, 5, 7), endpoint=True).astype(np.int32)
    acc[0, :, 0, :] = rng.integers(-3000, 3000, (channels, 7))  # in range for the larger multipliers
    var = relax.Var("acc", relax.TensorType(acc.shape, "int32"))
    builder = relax.BlockBuilder()
    per = (1, channels, 1, 1)
    with builder.function("main", [var]):
        out = builder.emit(requantize_relax(var, m.reshape(per), shift.reshape(per), 117, "uint8"))
        builder.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(builder.get(), target=tvm.target.Target.from_device(tvm.cpu())), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(acc)).numpy()
    want = requantize_reference(acc, m.reshape(per), shift.reshape(per), 117, "uint8")
    assert got.dtype == np.uint8 and np.array_equal(got, want)


class ResidualBlock(nn.Module):
    """conv -> relu -> [conv -> relu -> conv] + skip -> relu -> maxpool -> conv (channels not whole blocks)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, padding=1)
        self.c1 = nn.Conv2d(24, 24, 3, padding=1)
        self.c2 = nn.Conv2d(24, 24, 3, padding=1)
        self.c3 = nn.Conv2d(24, 20, 3, stride=2, padding=1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = self.c2(torch.relu(self.c1(x)))
        x = nn.functional.max_pool2d(torch.relu(x + y), 2)
        return self.c3(x)


@pytest.fixture(scope="module")
def residual_graph():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    calibration = [rng.uniform(-1, 1, (4, 3, 16, 16)).astype(np.float32) for _ in range(2)]
    graph, _ = tf.compress(tf.capture(ResidualBlock().eval(), torch.zeros(1, 3, 16, 16)), "int8",
                           calibration=calibration)
    return graph


def _run_lowered(graph, layout, fixed_point, x):
    import tvm
    from tvm import relax

    from tensorfold.targets.frontend import to_relax
    from tensorfold.targets.legalize import legalize
    from tensorfold.targets.int8.relax import lower_qdq

    lowered, lowering = lower_qdq(to_relax(graph)[0], layout, fixed_point=fixed_point)
    vm = relax.VirtualMachine(tvm.compile(legalize()(lowered), target=tvm.target.Target.from_device(tvm.cpu())),
                              tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy(), lowering


def _output_scale(model) -> float:
    from onnx import numpy_helper

    last = next(n for n in model.graph.node if n.output[0] == model.graph.output[0].name)
    return float(numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == last.input[1])))


def _host_dot_layout():
    from tensorfold.targets import get_target
    from tensorfold.targets.int8.layout import dot_layout_for

    return dot_layout_for(get_target("x86").tvm_target)


def test_fixed_point_lowering_requantizes_every_conv_in_integers(residual_graph):
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)
    fixed, lowering = _run_lowered(residual_graph, None, True, x)
    floated, float_lowering = _run_lowered(residual_graph, None, False, x)
    assert len(lowering.int8_ops) == 4 and all("fixed-point" in op for op in lowering.int8_ops), lowering.int8_ops
    assert not any("fixed-point" in op for op in float_lowering.int8_ops)
    step = _output_scale(residual_graph.model)
    # rounding differs only at ties (and in M's last bit): the outputs agree within one output step
    assert np.max(np.abs(fixed - floated)) <= 1.01 * step
    reference = residual_graph.run({residual_graph.inputs[0].name: x})[residual_graph.output_names[0]]
    assert np.max(np.abs(fixed - reference)) <= 1.01 * step


@pytest.mark.skipif(_host_dot_layout() is None, reason="this CPU has neither AVX-512 VNNI nor AVX2")
def test_blocked_fixed_point_lowering_is_bit_exact_with_nchw(residual_graph):
    rng = np.random.default_rng(4)
    x = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)[:1]
    nchw, _ = _run_lowered(residual_graph, None, True, x)
    blocked, lowering = _run_lowered(residual_graph, _host_dot_layout(), True, x)
    data = _host_dot_layout().data
    assert sum(data in op and "fixed-point" in op for op in lowering.int8_ops) == 4, lowering.int8_ops
    # one change into the blocked layout (the stem's input), one out (the graph output), and a u8
    # re-blocking NCHW16c -> NCHW4c (AVX2: NCHW8c -> NCHW2c) in front of each of the 3 convs that read
    # another conv's output
    assert lowering.layout_changes == {"to_blocked": 1, "from_blocked": 1, "reblock": 3}, lowering.layout_changes
    assert np.array_equal(nchw, blocked)


@pytest.mark.skipif(_host_dot_layout() is None, reason="this CPU has neither AVX-512 VNNI nor AVX2")
def test_blocked_network_build_has_one_layout_change_in_and_one_out(residual_graph, tmp_path):
    from tensorfold.targets import load_artifact

    built = tf.build(residual_graph, "x86", tmp_path / "blocked", progress=False, int8_network="blocked")
    lowering = built.manifest["int8"]
    assert lowering["layout_changes"] == {"to_blocked": 1, "from_blocked": 1, "reblock": 3}, lowering
    assert len(lowering["int8_kernels"]) == 4
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)
    got = next(iter(load_artifact(built.path)(x).values()))
    nchw, _ = _run_lowered(residual_graph, None, True, x)
    assert np.array_equal(got, nchw)


class ClipBlock(nn.Module):
    """conv -> relu6 -> conv -> hardswish -> conv: Clip's bounds reach Relax as scalar PrimValues, not tensors."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.c3 = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return self.c3(nn.functional.hardswish(self.c2(nn.functional.relu6(self.c1(x)))))


@pytest.mark.skipif(_host_dot_layout() is None, reason="this CPU has neither AVX-512 VNNI nor AVX2")
def test_blocked_lowering_passes_clip_bounds_through(tmp_path):
    # the held-out zoo's fpn-mobilenet_v3_small failed here once ("'int' object has no attribute 'numpy'")
    torch.manual_seed(0)
    rng = np.random.default_rng(6)
    calibration = [rng.uniform(-1, 1, (4, 3, 12, 12)).astype(np.float32)]
    graph, _ = tf.compress(tf.capture(ClipBlock().eval(), torch.zeros(1, 3, 12, 12)), "int8", calibration=calibration)
    x = rng.uniform(-1, 1, (1, 3, 12, 12)).astype(np.float32)
    nchw, _ = _run_lowered(graph, None, True, x)
    blocked, _ = _run_lowered(graph, _host_dot_layout(), True, x)
    assert np.array_equal(nchw, blocked)
