"""The `tensorfold` command end to end: the README's main command, model sources, errors."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision

from tensorfold.cli import main


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_readme_main_command_on_bundled_example(tmp_path, capsys):
    out, report_path = tmp_path / "digits.onnx", tmp_path / "report.json"
    assert main(["compress", "digits", "-p", "fold_bn", "-o", str(out), "--report", str(report_path)]) == 0
    printed = capsys.readouterr().out
    assert "test accuracy before" in printed and "test accuracy after" in printed
    report = json.loads(report_path.read_text())
    folded = [r for p in report["passes"] for r in p["records"] if r["action"] == "folded"]
    assert sorted(r["layer"] for r in folded) == ["bn1", "bn2", "bn3", "bn4"]
    # exact pass: accuracy identical, and high (the example is really trained)
    assert report["extra"]["test accuracy before"] == report["extra"]["test accuracy after"]
    assert report["extra"]["test accuracy before"] > 0.9
    model = onnx.load(out)
    onnx.checker.check_model(model)
    assert not [n for n in model.graph.node if n.op_type == "BatchNormalization"]

    # the written file computes what the original torch model computes
    from tensorfold.examples import digits
    images, _ = digits.test_data()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: images[:32]})[0]
    with torch.no_grad():
        want = digits.model(verbose=False)(torch.from_numpy(images[:32])).numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


def test_passes_lists_registered_passes_with_options(capsys):
    assert main(["passes"]) == 0
    printed = capsys.readouterr().out
    assert "fold_bn" in printed and "bn_before_conv=<bool>" in printed


def test_console_script_is_installed():
    exe = shutil.which("tensorfold")
    assert exe, "the tensorfold entry point is not on PATH (pip install -e . installs it)"
    result = subprocess.run([exe, "passes"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "fold_bn" in result.stdout


def test_torchvision_model_with_weights_file(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None).eval()
    for module in reference.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    weights = tmp_path / "r18.pt"
    torch.save(reference.state_dict(), weights)
    out = tmp_path / "r18.onnx"
    assert main(["compress", "torchvision:resnet18", "--weights", str(weights), "--input-shape", "1,3,64,64",
                 "-p", "fold_bn", "-o", str(out), "-q"]) == 0
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        want = reference(torch.from_numpy(x)).numpy()
    # the weights file was used: without it the outputs would be those of other random weights
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4


def test_factory_model_to_pt2(tmp_path):
    out = tmp_path / "digits.pt2"
    assert main(["compress", "tensorfold.examples.digits:model", "-p", "fold_bn", "-o", str(out), "-q"]) == 0
    program = torch.export.load(str(out))
    from tensorfold.examples import digits
    images, _ = digits.test_data()
    x = torch.from_numpy(images[:1])
    with torch.no_grad():
        want = digits.model(verbose=False)(x)
        got = program.module()(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("argv, expected", [
    (["torchvision:resnet18", "--input-shape", "1,3,64"], "--input-shape"),
    (["torchvision:resnet18", "--input-shape", "1,three"], "comma-separated"),
    (["torchvision:no_such_net"], "no classification model"),
    (["no.such.module:factory"], "cannot import"),
])
def test_bad_model_arguments_give_one_paragraph_errors(tmp_path, capsys, argv, expected):
    code = main(["compress", *argv, "-p", "fold_bn", "-o", str(tmp_path / "x.onnx"), "-q"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("tensorfold: error:") and expected in err
    assert "Traceback" not in err


def test_unknown_pass_lists_registered_ones(tmp_path, capsys):
    code = main(["compress", "digits", "-p", "fold_bn, no_such_pass", "-o", str(tmp_path / "x.onnx"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "no_such_pass" in err and "fold_bn" in err


def test_never_writes_over_the_input_file(tmp_path, capsys):
    source = tmp_path / "model.onnx"
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    torch.onnx.export(net, (torch.randn(1, 3, 8, 8),), str(source), dynamo=False, do_constant_folding=False)
    before = _sha(source)
    code = main(["compress", str(source), "-p", "fold_bn", "-o", str(source), "-q"])
    assert code == 2 and "input file" in capsys.readouterr().err
    assert _sha(source) == before


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "tensorfold.cli", "passes"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "fold_bn" in result.stdout


def test_build_of_a_task_prints_its_accuracy_before_and_after_the_passes(tmp_path, capsys):
    code = main(["build", "mnist1d-mlp", "-t", "x86", "-p", "svd(rank=8, data=true)", "-o", str(tmp_path / "art"), "-q"])
    assert code == 0
    out = capsys.readouterr().out
    before = float(out.split("test accuracy before:")[1].split()[0])
    after = float(out.split("test accuracy after:")[1].split()[0])
    assert before > 0.55 and 0 < after < before  # rank 8 of 100 loses accuracy: the figure is measured, not copied


def test_compress_finetunes_on_a_task_by_default_and_on_an_image_folder(tmp_path, capsys):
    from PIL import Image

    from tensorfold.runtime.tasks import get_task

    pipeline = "fold_bn, tucker2(rank=evbmf), finetune(epochs=2)"
    assert main(["compress", "digits", "-p", pipeline, "-o", str(tmp_path / "a.onnx"), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "finetune: training samples: 1294" in printed  # the task's training split, one in ten held out
    after = float(printed.split("test accuracy after: ")[1].split()[0])
    assert after > 0.9
    # an ImageFolder of the task's training images (grey PNGs, class folders) trains the same way
    x, y = get_task("digits").train_data()
    for i, (image, label) in enumerate(zip(x[:600], y[:600])):
        folder = tmp_path / "train" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.uint8(np.clip((image[0] * 0.5 + 0.5) * 255, 0, 255))).save(folder / f"{i}.png")
    assert main(["compress", "digits", "-p", pipeline, "-o", str(tmp_path / "b.onnx"), "-q",
                 "--train-data", str(tmp_path / "train")]) == 0
    printed = capsys.readouterr().out
    assert "finetune: training samples: 540" in printed
    assert float(printed.split("test accuracy after: ")[1].split()[0]) > 0.8
