"""fp32 convs in the blocked layout (targets/float_layout.py): same outputs as NCHW, one layout change in, one out."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tensorfold as tf
from tensorfold.ir.errors import BuildError
from tensorfold.targets import get_target, load_artifact
from tensorfold.targets.float_layout import block_convs, lanes_for
from tensorfold.targets.frontend import to_relax

HOST_LANES = lanes_for(get_target("x86").tvm_target)
needs_lanes = pytest.mark.skipif(HOST_LANES is None, reason="this CPU has neither AVX-512 nor AVX2")


class Residual(nn.Module):
    """An RGB stem (3 input channels: a block of 3), a residual block, a strided block with a 1x1 shortcut."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.down = nn.Conv2d(16, 32, 1, stride=2)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.conv1(x)) + x
        x = torch.relu(self.conv2(x) + self.down(x))
        x = nn.functional.max_pool2d(x, 2)
        return self.fc(x.mean((2, 3)))


class Mixed(Residual):
    """Adds a depthwise conv with ReLU6 (blocked too) and what stays NCHW: a conv whose 10 outputs fill no
    block of 16 or 8, and a grouped conv that is not depthwise."""

    def __init__(self):
        super().__init__()
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.grouped = nn.Conv2d(32, 32, 1, groups=2)
        self.odd = nn.Conv2d(32, 10, 1)
        self.fc = nn.Linear(10, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.conv1(x)) + x
        x = torch.relu(self.conv2(x) + self.down(x))
        x = self.odd(self.grouped(nn.functional.relu6(self.depthwise(x))))
        return self.fc(x.mean((2, 3)))


def _graph(module, shape=(1, 3, 30, 34)):
    torch.manual_seed(0)
    module = module.eval()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        module.bn.running_mean.uniform_(-0.5, 0.5)
        module.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(*shape)
    return tf.capture(module, x), module, x


@needs_lanes
@pytest.mark.parametrize("make, blocked", [(Residual, 4), (Mixed, 5)])
def test_blocked_build_computes_what_the_nchw_build_and_torch_compute(make, blocked, tmp_path):
    graph, module, x = _graph(make())
    with torch.no_grad():
        expected = module(x).numpy()
    outputs = {}
    for network in ("blocked", "nchw"):
        artifact = tf.build(graph, "x86", tmp_path / network, float_network=network, progress=False,
                            tuning_db=tmp_path / "db")
        outputs[network] = next(iter(load_artifact(artifact.path)(x.numpy()).values()))
        report = artifact.manifest["float_convs_blocked"]
        if network == "blocked":
            assert report == {"lanes": HOST_LANES, "convs": blocked}  # grouped and 10-output convs stay NCHW
        else:
            assert report is None
    scale = np.abs(expected).max()
    np.testing.assert_allclose(outputs["blocked"], expected, atol=1e-4 * scale, rtol=0)
    np.testing.assert_allclose(outputs["blocked"], outputs["nchw"], atol=1e-5 * scale, rtol=0)


class InvertedResidual(nn.Module):
    """MobileNet-v2's block: 1x1 expand, ReLU6, depthwise 3x3, ReLU6, 1x1 project, residual add."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(32)
        self.stem = nn.Conv2d(3, 32, 3, stride=2, padding=1)
        self.expand = nn.Conv2d(32, 64, 1)
        self.depthwise = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.project = nn.Conv2d(64, 32, 1)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = nn.functional.relu6(self.bn(self.stem(x)))
        y = nn.functional.relu6(self.depthwise(nn.functional.relu6(self.expand(x))))
        return self.fc((x + self.project(y)).mean((2, 3)))


def _layout_changes(module, expected_convs):
    from tvm import ir, relax

    graph, _, _ = _graph(module)
    mod, count = block_convs(to_relax(graph)[0], HOST_LANES)
    assert count == expected_convs
    changes = []

    def visit(expr):
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.layout_transform":
            changes.append(expr)

    relax.analysis.post_order_visit(mod["main"].body, visit)
    # the weights' changes were folded into constants at build time: what is left moves activations
    assert all(not isinstance(c.args[0], ir.expr.Constant) for c in changes)
    return changes


@needs_lanes
def test_activations_change_layout_once_in_and_once_out():
    changes = _layout_changes(Residual(), 4)
    assert len(changes) == 2, [str(c.ty) for c in changes]
    shapes = [[int(d) for d in c.ty.shape] for c in changes]
    assert shapes[0] == [1, 1, 30, 34, 3]   # the RGB input, blocked by its 3 channels
    assert shapes[1] == [1, 32]             # after the mean, for the classifier


@needs_lanes
def test_relu6_and_depthwise_stay_blocked():
    changes = _layout_changes(InvertedResidual(), 4)
    assert len(changes) == 2, [str(c.ty) for c in changes]


@needs_lanes
def test_inverted_residual_computes_what_torch_computes(tmp_path):
    graph, module, x = _graph(InvertedResidual())
    with torch.no_grad():
        expected = module(x).numpy()
    artifact = tf.build(graph, "x86", tmp_path / "a", progress=False, tuning_db=tmp_path / "db")
    assert artifact.manifest["float_convs_blocked"] == {"lanes": HOST_LANES, "convs": 4}
    got = next(iter(load_artifact(artifact.path)(x.numpy()).values()))
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max(), rtol=0)


def test_lanes_follow_the_vector_width():
    def x86(mcpu):
        return {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu}

    assert lanes_for(x86("skylake-avx512")) == 16
    assert lanes_for(x86("haswell")) == 8
    assert lanes_for(x86("x86-64")) is None          # SSE only: left as imported
    assert lanes_for({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76"}) is None
    assert lanes_for({"kind": "cuda", "arch": "sm_80"}) is None


def test_unknown_float_network_is_a_clear_error(tmp_path):
    graph, _, _ = _graph(Residual())
    with pytest.raises(BuildError, match="float_network='fast'.*auto, blocked, nchw"):
        tf.build(graph, "x86", tmp_path / "a", float_network="fast", progress=False)
    assert not (tmp_path / "a").exists()



@needs_lanes
def test_a_failing_layout_conversion_leaves_the_nchw_graph_and_says_why(tmp_path, monkeypatch):
    import importlib

    target_build = importlib.import_module("tensorfold.targets.build")  # the module, not the function

    def fails(mod, lanes):  # as TVM 0.27's ConvertLayout did on a graph of topk ops (std::bad_alloc)
        raise RuntimeError("std::bad_alloc")

    monkeypatch.setattr(target_build, "block_convs", fails)
    graph, module, x = _graph(Residual())
    with torch.no_grad():
        expected = module(x).numpy()
    artifact = tf.build(graph, "x86", tmp_path / "a", progress=False, tuning_db=tmp_path / "db")
    report = artifact.manifest["float_convs_blocked"]
    assert report["convs"] == 0 and "ConvertLayout failed: RuntimeError: std::bad_alloc" in report["kept_nchw"]
    got = next(iter(load_artifact(artifact.path)(x.numpy()).values()))
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max(), rtol=0)


@needs_lanes
def test_the_fma_step_tensorizes_the_blocked_conv_and_computes_it(tmp_path):
    """The tuning space's intrinsic (C[lanes] += A[4] x B[4, lanes]) replaces the conv's inner loops exactly."""
    import subprocess

    import tvm
    from tvm import s_tir, te

    from tensorfold.targets.float_layout import BLOCKED_KERNEL, _conv2d_te
    from tensorfold.targets.tuning.intrinsics import register_fma

    lanes = HOST_LANES
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 2 * lanes, 9, 11)).astype(np.float32)
    w = rng.standard_normal((2 * lanes, 2 * lanes, 3, 3)).astype(np.float32)
    data = np.ascontiguousarray(x.reshape(1, 2, lanes, 9, 11).transpose(0, 1, 3, 4, 2))
    kernel = np.ascontiguousarray(w.reshape(2, lanes, 2, lanes, 3, 3).transpose(0, 2, 4, 5, 3, 1))
    d = te.placeholder(data.shape, "float32", name="data")
    k = te.placeholder(kernel.shape, "float32", name="kernel")
    out = _conv2d_te(d, k, (1, 2), [1, 1, 1, 1], (1, 1), False)
    sch = s_tir.Schedule(te.create_prim_func([d, k, out]))
    block = sch.get_sblock(BLOCKED_KERNEL)
    b, ob, y, x_, oi, rc, ry, rx, ri = sch.get_loops(block)
    ri_outer, ri_inner = sch.split(ri, [None, 4])
    sch.reorder(b, ob, y, rc, ry, rx, ri_outer, x_, oi, ri_inner)
    sch.decompose_reduction(block, rc)
    sch.tensorize(oi, register_fma(lanes))  # fails unless the compute is exactly the intrinsic's step
    lib = tvm.compile(sch.mod, target=get_target("x86").tvm())
    result = tvm.runtime.tensor(np.zeros((1, 2, 9, 6, lanes), np.float32))
    lib["main"](tvm.runtime.tensor(data), tvm.runtime.tensor(kernel), result)
    got = result.numpy().transpose(0, 1, 4, 2, 3).reshape(1, 2 * lanes, 9, 6)
    want = torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(w), stride=(1, 2), padding=1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    library = tmp_path / "kernel.so"
    lib.export_library(str(library))
    register = "zmm" if lanes == 16 else "ymm"
    code = subprocess.run(["objdump", "-d", str(library)], capture_output=True, text=True).stdout
    assert any("vfmadd" in line and register in line for line in code.splitlines())


@needs_lanes
def test_blocked_float_convs_tune_in_the_fma_space_and_compute_what_torch_computes(tmp_path):
    import tvm.s_tir.meta_schedule as ms

    from tensorfold.targets.build import _prepare
    from tensorfold.targets.tuning.spaces import spaces

    graph, module, x = _graph(Mixed())
    target = get_target("x86")
    mod, _ = block_convs(to_relax(graph)[0], HOST_LANES)
    tasks = ms.relax_integration.extract_tasks(_prepare(mod, target, True), target.tvm())
    groups = {tuple(sorted(t.task_name for t in group)): space for group, space in spaces(tasks, target)}
    fma = [names for names, space in groups.items() if space != "post-order-apply"]
    assert len(fma) == 1  # one group with the tensorizing rules: the groups-1 blocked convs, not the depthwise
    assert all("conv2d_NCHWc_float" in n and "depthwise" not in n for n in fma[0])
    default = [n for names in groups for n in names if names not in fma]
    assert any("depthwise_conv2d_NCHWc_float" in n for n in default)
    # of the 4 groups-1 blocked convs, the RGB stem (a block of 3 input channels: no whole step of 4)
    # keeps the default space
    stem = [n for n in default if "conv2d_NCHWc_float" in n and "depthwise" not in n]
    assert len(fma[0]) == 3 and len(stem) == 1 and "subtract" in stem[0]  # the unfolded BN follows the stem
    artifact = tf.build(graph, "x86", tmp_path / "tuned", tune_trials=16, progress=False, tuning_db=tmp_path / "db")
    with torch.no_grad():
        expected = module(x).numpy()
    got = next(iter(load_artifact(artifact.path)(x.numpy()).values()))
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max(), rtol=0)
    assert artifact.manifest["tuning"]["trials_spent"] > 0
