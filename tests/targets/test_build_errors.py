"""What a user sees when a build cannot go through, and the `tensorfold build` command end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from onnx import helper
from torch import nn

import tensorfold as tf
from tensorfold.cli import main
from tensorfold.ir.errors import BuildError


def test_unsupported_onnx_op_names_the_node(tools, tmp_path):
    rng = np.random.default_rng(0)
    model = tools.make_onnx_model(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv_in", pads=[1, 1, 1, 1]),
         helper.make_node("Celu", ["c"], ["y"], name="odd_activation", alpha=1.0)],  # no Relax converter
        inputs={"x": (1, 3, 8, 8)}, outputs={"y": (1, 4, 8, 8)},
        initializers={"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32)})
    path = tools.save_onnx(model)
    with pytest.raises(BuildError) as info:
        tf.build(path, "x86", tmp_path / "out", progress=False)
    message = str(info.value)
    assert "'odd_activation'" in message and "'Celu'" in message and path in message
    assert not isinstance(info.value.__cause__, AssertionError)


class _Odd(nn.Module):
    def forward(self, x):
        return torch.erfinv(torch.tanh(x))  # aten.erfinv: no converter in the Relax torch frontend


class _WithOddLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.odd = _Odd()

    def forward(self, x):
        return self.odd(self.conv(x))


def test_unsupported_torch_op_names_the_node_and_layer(tmp_path):
    graph = tf.capture(_WithOddLayer().eval(), (torch.randn(1, 3, 8, 8),))
    with pytest.raises(BuildError) as info:
        tf.build(graph, "x86", tmp_path / "out", progress=False)
    message = str(info.value)
    assert "erfinv" in message and "'odd'" in message and "_Odd" in message
    assert "Unsupported function types" not in message  # the frontend's bare AssertionError text


def test_negative_trial_budget_is_refused(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    with pytest.raises(BuildError, match="tune_trials"):
        tf.build(model, "x86", tmp_path / "out", tune_trials=-1, example_inputs=(torch.randn(1, 3, 8, 8),))


def test_cli_build_compresses_then_builds(tmp_path, capsys):
    out, report = tmp_path / "digits-x86", tmp_path / "build.json"
    assert main(["build", "digits", "--target", "x86", "-p", "fold_bn", "-o", str(out), "--report", str(report),
                 "--tuning-db", str(tmp_path / "db"), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "fold_bn" in printed and "trials spent" in printed and str(out) in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == json.loads(report.read_text())
    assert manifest["tuning"]["database"] == str(tmp_path / "db") and not manifest["tuning"]["database_found"]

    from tensorfold.examples import digits
    from tensorfold.models import resolve
    from tensorfold.targets import load_artifact

    images, _ = digits.test_data()
    x = np.asarray(images[:1], np.float32).reshape(manifest["inputs"][0]["shape"])
    expected = resolve("digits").run({manifest["inputs"][0]["name"]: x})["output0"]
    got = load_artifact(out)(x)["output0"]
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-4
