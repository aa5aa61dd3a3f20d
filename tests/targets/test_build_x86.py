"""x86 builds from torch and from ONNX match torch; the artifact reloads in a fresh process."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch
import torchvision
from torch import nn

import tensorfold as tf
from tensorfold.targets import load_artifact

TOLERANCE = 1e-4  # relative (norm) error against torch, issue 5


class SmallCnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def _model(tools, name: str) -> tuple[nn.Module, tuple[int, ...]]:
    if name == "small_cnn":
        return tools.randomize_batchnorms(SmallCnn()).eval(), (1, 3, 32, 32)
    # 64x64 instead of 224 keeps the build and the run short; the graph is the same
    return tools.randomize_batchnorms(torchvision.models.mobilenet_v2(weights=None)).eval(), (1, 3, 64, 64)


@pytest.mark.parametrize("name", ["small_cnn", "mobilenet_v2"])
@pytest.mark.parametrize("frontend", ["torch", "onnx"])
def test_x86_build_matches_torch(tools, tmp_path, name, frontend):
    model, shape = _model(tools, name)
    x = torch.randn(*shape)
    expected = tools.torch_output(model, x)
    if frontend == "torch":
        graph = tf.capture(model, (x,))
    else:
        graph = tf.load(tools.export_to_onnx(model, x))
    artifact = tf.build(graph, "x86", tmp_path / "artifact", progress=False)

    manifest = json.loads((tmp_path / "artifact" / "manifest.json").read_text())
    assert manifest["frontend"] == ("torch.export" if frontend == "torch" else "onnx")
    assert manifest["inputs"] == [{"name": graph.inputs[0].name, "shape": list(shape), "dtype": "float32"}]
    assert manifest["outputs"][0]["shape"] == [1, expected.shape[1]]
    assert manifest["target"]["name"] == "x86" and manifest["target"]["tvm"]["kind"] == "llvm"
    assert {"tensorfold", "tvm", "torch"} <= set(manifest["versions"])
    assert manifest["tuning"]["trials_spent"] == 0 and manifest["tuning"]["budget"] == 0
    assert (tmp_path / "artifact" / "model.so").is_file()

    outputs = load_artifact(artifact.path)(x.numpy())
    assert list(outputs) == [o["name"] for o in manifest["outputs"]]
    error = tools.relative_error(expected, next(iter(outputs.values())))
    assert error < TOLERANCE, f"{name} from {frontend}: relative error {error:.2e}"


def test_onnx_build_keeps_onnx_input_names(tools, tmp_path):
    model, x = SmallCnn().eval(), torch.randn(2, 3, 16, 16)
    path = tools.export_to_onnx(model, x)
    artifact = tf.build(path, "x86", tmp_path / "a", progress=False)
    assert [i["name"] for i in artifact.manifest["inputs"]] == ["input"]
    assert [o["name"] for o in artifact.manifest["outputs"]] == [o.name for o in onnx.load(path).graph.output]
    outputs = artifact.load()(input=x.numpy())  # by name
    assert tools.relative_error(tools.torch_output(model, x), outputs["output"]) < TOLERANCE


@pytest.mark.parametrize("opset", [11, 13])
def test_file_from_another_exporter_builds_once_its_shapes_are_fixed(tools, tmp_path, opset):
    """Symbolic dims and a Shape -> Gather -> Concat -> Reshape target: the Relax frontend refused the
    Reshape ("requires the input new shape to be Shape"); folded for the fixed shapes, it builds."""
    path = tools.save_onnx(tools.wild_onnx_model(opset), "wild.onnx")
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 48)).astype(np.float32)
    artifact = tf.build(tf.load(path, input_shapes={"x": x.shape}), "x86", tmp_path / "a", progress=False)
    assert [o["shape"] for o in artifact.manifest["outputs"]] == [[2, 10], [2, 4, 8]]
    outputs = artifact.load()(x=x)
    expected = tools.run_onnxruntime(path, {"x": x})
    for name, reference in zip(("logits", "tokens"), expected):
        assert tools.relative_error(reference, outputs[name]) < TOLERANCE, name


def test_artifact_reloads_in_a_fresh_process(tools, tmp_path):
    model, x = tools.randomize_batchnorms(SmallCnn()).eval(), torch.randn(1, 3, 32, 32)
    artifact = tf.build(tf.capture(model, (x,)), "x86", tmp_path / "artifact", progress=False)
    in_process = artifact.load()(x.numpy())["output0"]
    np.save(tmp_path / "x.npy", x.numpy())
    # Both ways a user has: tensorfold's loader, and plain TVM with no tensorfold import.
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        import tvm
        from tvm import relax
        x = np.load({str(tmp_path / 'x.npy')!r})
        manifest = json.load(open({str(tmp_path / 'artifact' / 'manifest.json')!r}))
        lib = tvm.runtime.load_module({str(tmp_path / 'artifact')!r} + "/" + manifest["files"]["library"])
        vm = relax.VirtualMachine(lib, tvm.cpu())
        out = vm["main"](tvm.runtime.tensor(x))
        out = out if hasattr(out, "numpy") else out[0]
        np.save({str(tmp_path / 'plain.npy')!r}, out.numpy())
        assert "tensorfold" not in sys.modules
        from tensorfold.targets.artifact import load_artifact
        np.save({str(tmp_path / 'loaded.npy')!r}, load_artifact({str(tmp_path / 'artifact')!r})(x)["output0"])
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    np.testing.assert_array_equal(np.load(tmp_path / "plain.npy"), in_process)
    np.testing.assert_array_equal(np.load(tmp_path / "loaded.npy"), in_process)
    assert tools.relative_error(tools.torch_output(model, x), in_process) < TOLERANCE


def test_loader_checks_input_shapes(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    artifact = tf.build(model, "x86", tmp_path / "a", example_inputs=(torch.randn(1, 3, 8, 8),), progress=False)
    with pytest.raises(tf.TensorfoldError, match="built for \\(1, 3, 8, 8\\)"):
        artifact.load()(np.zeros((1, 3, 9, 9), np.float32))
