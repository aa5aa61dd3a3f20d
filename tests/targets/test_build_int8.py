"""A QDQ int8 graph builds with TVM into integer convolutions and matmuls, and keeps its accuracy."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import tensorfold as tf
from tensorfold.examples import digits
from tensorfold.targets import load_artifact
from tensorfold.targets.int8.amx import host_amx_mattr

HOST_AMX = bool(host_amx_mattr())


@pytest.fixture(scope="module")
def digits_graphs():
    graph = tf.capture(digits.model(verbose=False), torch.zeros(digits.INPUT_SHAPE))
    fp32, _ = tf.compress(graph, "fold_bn")
    int8, _ = tf.compress(fp32, "int8", calibration="digits")
    return fp32, int8


def _artifact_accuracy(artifact, images, labels) -> float:
    run = load_artifact(artifact.path)
    logits = np.concatenate([next(iter(run(images[i:i + 1]).values())) for i in range(len(images))])
    return float(np.mean(logits.argmax(1) == labels))


def test_digits_int8_build_runs_int8_kernels_within_half_a_point(digits_graphs, tmp_path):
    fp32, int8 = digits_graphs
    images, labels = digits.test_data()
    built_fp32 = tf.build(fp32, "x86", tmp_path / "fp32", progress=False)
    built_int8 = tf.build(int8, "x86", tmp_path / "int8", progress=False)

    lowering = built_int8.manifest["int8"]
    assert len(lowering["int8_ops"]) == 5 and lowering["float_ops"] == []  # 3 convs, 2 matmuls
    assert len(lowering["int8_kernels"]) == 5
    kinds = {k.split(": ")[1] for k in lowering["int8_kernels"]}
    layout = _host_dot_layout()
    widened = layout is not None and layout.data_dtype == "int16"  # AVX2: the blocked ops multiply s16 widenings
    assert kinds == ({"int16 x int16 -> int32"} if widened else {"uint8 x int8 -> int32"})
    # with a dot-product layout the two matmuls (1024 -> 128, 128 -> 10) run as blocked 1x1 convs too
    assert sum("as a blocked 1x1 conv2d" in op for op in lowering["int8_ops"]) == (2 if layout else 0)
    assert built_fp32.manifest["int8"] is None
    # and in the machine code: x86 int8 multiply-adds (VNNI vpdpbusd/vpdpwssd, or vpmaddwd/vpmaddubsw)
    machine = lowering["machine_instructions"]
    assert sum(machine["instructions"].values()) > 0, machine

    fp32_accuracy = _artifact_accuracy(built_fp32, images, labels)
    int8_accuracy = _artifact_accuracy(built_int8, images, labels)
    assert int8_accuracy >= fp32_accuracy - 0.005, (fp32_accuracy, int8_accuracy)


class Awkward(nn.Module):
    """Stride, padding, dilation, groups, odd sizes; activations of both signs, so zero points are far from 0."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4, bias=False)
        self.fc = nn.Linear(8 * 5 * 6, 7)

    def forward(self, x):
        x = self.conv1(x)
        x = self.conv2(x)
        return self.fc(torch.flatten(x, 1))


def _host_dot_layout():
    from tensorfold.targets import get_target
    from tensorfold.targets.int8.layout import dot_layout_for

    return dot_layout_for(get_target("x86").tvm_target)


needs_dot_layout = pytest.mark.skipif(_host_dot_layout() is None, reason="this CPU has neither AVX-512 VNNI nor AVX2")


@pytest.mark.parametrize("blocked", [False, pytest.param(True, marks=needs_dot_layout)], ids=["nchw", "blocked"])
def test_lowering_matches_the_float_qdq_math(tmp_path, blocked):
    from tvm import relax
    import tvm
    from tensorfold.targets.frontend import to_relax
    from tensorfold.targets.legalize import legalize
    from tensorfold.targets.int8.relax import lower_qdq

    torch.manual_seed(0)
    model = Awkward().eval()
    rng = np.random.default_rng(0)
    calibration = [rng.uniform(-1, 2, (8, 3, 10, 11)).astype(np.float32) for _ in range(2)]
    graph, _ = tf.compress(tf.capture(model, torch.zeros(1, 3, 10, 11)), "int8", calibration=calibration)
    mod, _ = to_relax(graph)
    lowered, lowering = lower_qdq(mod, _host_dot_layout() if blocked else None)
    assert len(lowering.int8_ops) == 3 and not lowering.float_ops
    # conv1 (3 -> 8 channels: both padded to whole blocks) is blocked; grouped conv2 is not
    blocked_data = _host_dot_layout().data if blocked else "NCHW?c"  # NCHW4c (VNNI), NCHW2c (AVX2)
    assert sum(blocked_data in op for op in lowering.int8_ops) == (1 if blocked else 0), lowering.int8_ops
    lowered = legalize()(lowered)

    x = rng.uniform(-1, 2, (1, 3, 10, 11)).astype(np.float32)
    target = tvm.target.Target.from_device(tvm.cpu())
    outputs = []
    for module in (mod, lowered):
        vm = relax.VirtualMachine(tvm.compile(module, target=target), tvm.cpu())
        outputs.append(vm["main"](tvm.runtime.tensor(x)).numpy())
    reference = graph.run({graph.inputs[0].name: x})[graph.output_names[0]]
    final_scale = _output_scale(graph.model)
    # the integer path computes the same sums exactly; float rounding may flip a quantized value by one step
    assert np.max(np.abs(outputs[1] - outputs[0])) <= 1.01 * final_scale
    assert np.max(np.abs(outputs[1] - reference)) <= 1.01 * final_scale


def _output_scale(model: onnx.ModelProto) -> float:
    from onnx import numpy_helper

    last = next(n for n in model.graph.node if n.output[0] == model.graph.output[0].name)
    scale = next(t for t in model.graph.initializer if t.name == last.input[1])
    return float(numpy_helper.to_array(scale))


def test_arm64_int8_build_multiplies_integers_in_neon(digits_graphs, tmp_path):
    _, int8 = digits_graphs
    built = tf.build(int8, "arm64", tmp_path / "arm64", progress=False)
    lowering = built.manifest["int8"]
    assert len(lowering["int8_kernels"]) == 5
    found = lowering["machine_instructions"]["instructions"]
    # widening integer multiply-accumulates (smlal/umlal) or dot products (sdot/udot) in the aarch64 code
    assert sum(count for name, count in found.items() if name[1:4] in ("mla", "mul", "dot")) > 0, found


@pytest.mark.parametrize(("stride", "padding", "dilation", "channels"), [
    (1, (1, 1, 1, 1), 1, (32, 16)),     # whole blocks
    (2, (1, 2, 0, 1), 2, (3, 5)),       # both channel counts padded, asymmetric padding
])
@needs_dot_layout
def test_blocked_conv2d_sums_exactly_what_the_nchw_conv_sums(stride, padding, dilation, channels):
    import types

    import tvm
    from tvm import relax

    from tensorfold.targets.int8.layout import blocked_conv2d, unblock
    from tensorfold.targets.legalize import legalize

    layout = _host_dot_layout()
    c_in, c_out = channels
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (1, c_in, 11, 9), dtype=np.uint8)
    w = rng.integers(-127, 128, (c_out, c_in, 3, 3), dtype=np.int8)
    zero = 37
    attrs = types.SimpleNamespace(padding=padding, strides=(stride, stride), dilation=(dilation, dilation))
    top, left, bottom, right = padding
    ref = torch.nn.functional.conv2d(
        torch.nn.functional.pad(torch.tensor(x, dtype=torch.float64), (left, right, top, bottom), value=zero),
        torch.tensor(w, dtype=torch.float64), stride=stride, dilation=dilation).numpy()

    var = relax.Var("x", relax.TensorType(x.shape, "uint8"))
    builder = relax.BlockBuilder()
    with builder.function("main", [var]):
        acc, padded, _ = blocked_conv2d(var, w, zero, attrs, layout)
        out = builder.emit(unblock(acc, ref.shape, padded))
        builder.emit_func_output(out)
    mod = legalize()(builder.get())
    vm = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target.from_device(tvm.cpu())), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    assert got.dtype == np.int32 and got.shape == ref.shape
    assert np.array_equal(got, ref.astype(np.int64))


def test_arm64_lays_convs_out_for_sdot_only_where_the_cpu_has_it(digits_graphs, tmp_path):
    _, int8 = digits_graphs
    plain = tf.build(int8, "arm64", tmp_path / "plain", progress=False).manifest["int8"]
    dotprod = tf.build(int8, "arm64:cortex-a76", tmp_path / "a76", progress=False).manifest["int8"]
    assert plain["dot_product"] is None and not any("NCHW4c" in op for op in plain["int8_ops"])
    assert dotprod["dot_product"] == "sdot"
    assert sum("s8 x s8 -> s32 in NCHW4c (sdot)" in op for op in dotprod["int8_ops"]) == 3, dotprod["int8_ops"]
    assert len(dotprod["int8_kernels"]) == 5


@needs_dot_layout
def test_nchw_lowering_leaves_the_dot_product_layout_out_and_computes_the_same(digits_graphs, tmp_path):
    _, int8 = digits_graphs
    nchw = tf.build(int8, "x86", tmp_path / "nchw", progress=False, int8_network="nchw")
    blocked = tf.build(int8, "x86", tmp_path / "per-conv", progress=False)
    assert nchw.manifest["int8"]["dot_product"] is None
    assert not any(" in NCHW" in op for op in nchw.manifest["int8"]["int8_ops"]), nchw.manifest["int8"]["int8_ops"]
    assert sum(" in NCHW" in op for op in blocked.manifest["int8"]["int8_ops"]) == 3
    images = digits.test_data()[0][:4]
    outputs = [np.concatenate([next(iter(load_artifact(b.path)(images[i:i + 1]).values())) for i in range(4)])
               for b in (nchw, blocked)]
    assert np.max(np.abs(outputs[0] - outputs[1])) <= 1.01 * _output_scale(int8.model)


def _qemu_missing():
    from tensorfold.targets import qemu

    return qemu.missing_runtime()


@pytest.mark.skipif(_qemu_missing() is not None, reason="arm64 under qemu unavailable")
def test_arm64_int8_convs_tune_into_sdot_on_the_device(tracker, tmp_path):
    """Tuned through the tracker on the emulated arm64 (cortex-a76: dotprod), the convs use sdot and stay exact."""
    from tensorfold.runtime import tvm_engine
    from tensorfold.targets import get_target, qemu, rpc

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2)).eval()
    rng = np.random.default_rng(0)
    calibration = [rng.uniform(-1, 2, (4, 8, 12, 12)).astype(np.float32) for _ in range(2)]
    graph, _ = tf.compress(tf.capture(model, torch.zeros(1, 8, 12, 12)), "int8", calibration=calibration)
    host, port = tracker
    target = rpc.placed(get_target("arm64:cortex-a76"), f"{host}:{port}", "a76-int8")
    x = rng.uniform(-1, 2, (1, 8, 12, 12)).astype(np.float32)
    with qemu.start_arm64_server(host, port, "a76-int8"):
        built = tf.build(graph, target, tmp_path / "a76", tune_trials=12, tuning_db=tmp_path / "db", progress=False)
        run = tvm_engine.prepare_remote(str(built.path), rpc.request_session(host, port, "a76-int8"))
        got = next(iter(run({built.manifest["inputs"][0]["name"]: x}).values()))
    lowering = built.manifest["int8"]
    assert built.manifest["tuning"]["untuned"] == []
    assert len(lowering["tensorized_kernels"]) == 2, lowering  # both convs, tensorized with sdot
    assert all("conv2d_NCHWc_int8" in name for name in lowering["tensorized_kernels"])
    assert lowering["machine_instructions"]["instructions"].get("sdot", 0) > 0, lowering["machine_instructions"]
    reference = graph.run({graph.inputs[0].name: x})[graph.output_names[0]]
    assert np.max(np.abs(got - reference)) <= 1.01 * _output_scale(graph.model)


def test_tuned_int8_build_leaves_no_task_untuned(digits_graphs, tmp_path):
    _, int8 = digits_graphs
    built = tf.build(int8, "x86", tmp_path / "tuned", tune_trials=24, tuning_db=str(tmp_path / "db"), progress=False)
    tuning = built.manifest["tuning"]
    assert tuning["trials_spent"] > 0
    assert tuning["untuned"] == [] and tuning["replay_failed"] == [], tuning["untuned"]
    lowering = built.manifest["int8"]
    assert len(lowering["int8_kernels"]) == 5
    layout = _host_dot_layout()
    if layout is not None:
        # the 3 convolutions and 2 matmuls run tensorized on the dot product (vpdpbusd with VNNI, vpmaddwd on
        # AVX2), in the schedules tuning found
        # (on a CPU with AMX the convs with >= 64 input channels run on its tiles instead: test_int8_amx.py)
        assert lowering["dot_product"] == ("tdpbusd + " if HOST_AMX else "") + layout.instruction
        # 3 convs and 2 matmuls are blocked; the space also holds untensorized tilings, and at 24 trials for 5 tasks
        # one task's best may be one of those (seen once in CI), so most, not all, must be tensorized
        assert len(lowering["tensorized_kernels"]) >= 3, lowering["tensorized_kernels"]
        assert all("conv2d_NCHWc_int8" in name or "conv2d_NCHW64c_amx" in name
                   for name in lowering["tensorized_kernels"])
        assert lowering["machine_instructions"]["instructions"].get(layout.instruction, 0) > 0
    # the tensorized kernels compute what onnxruntime computes on the QDQ graph (a step apart at rounding ties)
    images = digits.test_data()[0][:8]
    run = load_artifact(built.path)
    got = np.concatenate([next(iter(run(images[i:i + 1]).values())) for i in range(len(images))])
    reference = int8.run({int8.inputs[0].name: images})[int8.output_names[0]]
    assert np.max(np.abs(got - reference)) <= 1.01 * _output_scale(int8.model)

    # a new process whose first build is fp32 reads the same database: its tensorized records name
    # tensorfold's intrinsic, which only the int8 lowering registered before (the second run of a benchmark
    # failed: "TensorIntrin 'tensorfold_dot_16x4_vnni' is not registered")
    fp32, _ = digits_graphs
    fp32.save(str(tmp_path / "fp32.onnx"))
    again = subprocess.run([sys.executable, "-m", "tensorfold.cli", "build", str(tmp_path / "fp32.onnx"), "-t", "x86",
                            "-o", str(tmp_path / "fp32-artifact"), "--tuning-db", str(tmp_path / "db"), "-q"],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]


def test_int8_tasks_get_the_search_space_their_layout_needs(digits_graphs):
    import tvm.s_tir.meta_schedule as ms

    from tensorfold.targets import get_target
    from tensorfold.targets.build import _prepare
    from tensorfold.targets.frontend import to_relax
    from tensorfold.targets.int8.relax import lower_qdq
    from tensorfold.targets.tuning.spaces import spaces

    target = get_target("x86")
    layout = _host_dot_layout()
    mod, _ = lower_qdq(to_relax(digits_graphs[1])[0], layout)
    tasks = ms.relax_integration.extract_tasks(_prepare(mod, target, True), target.tvm())
    groups = spaces(tasks, target)
    assert sum(len(group) for group, _ in groups) == len(tasks)
    names = [{t.task_name for t in group} for group, _ in groups]
    default = names[0]
    assert groups[0][1] == "post-order-apply"
    assert not any("conv2d" in name or "matmul" in name for name in default)
    integer = names[1:]
    if layout is None:  # 3 convs and 2 matmuls with the generic LLVM rules
        assert [len(n) for n in integer] == [5]
    else:  # the 3 convs and the 2 matmuls (as 1x1 convs) blocked, with the tensorizing rules of the layout
        assert [len(n) for n in integer] == [5]
        assert all("conv2d_NCHWc_int8" in name for name in integer[0])
