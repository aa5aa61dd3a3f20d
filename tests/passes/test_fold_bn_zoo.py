"""fold_bn is exact on real architectures: torchvision classifiers, captured with FX and exported to ONNX.

Weights are random (`weights=None`) and every batch norm gets random running statistics,
gamma and beta, so folding is far from the identity. Each case prints one line,
`ZOO <architecture> <front end> <max relative error>` (run with `pytest -s` to see them).
"""
from __future__ import annotations

import functools
import re

import numpy as np
import onnx
import pytest
import torch
import torchvision
from torch import nn

import tensorfold as tf

TOLERANCE = 1e-4
slow = pytest.mark.slow


@functools.lru_cache(maxsize=1)
def _factories() -> dict:
    models = torchvision.models
    return {
        "googlenet": lambda: models.googlenet(weights=None, aux_logits=False, init_weights=True),
        **{name: functools.partial(getattr(models, name), weights=None) for name in (
            "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "densenet121",
            "regnet_x_400mf", "shufflenet_v2_x0_5", "mnasnet0_5")},
    }


# architecture -> (input side, pattern of the batch norms that cannot fold, the reason they give)
# DenseNet is pre-activation: norm1 and the transition norms read a concat and feed a ReLU,
# norm5 reads the last concat; no conv/linear sits next to them, so there is nothing to fold into.
_DENSENET_UNFOLDABLE = (re.compile(r"denselayer\d+[./]norm1|transition\d[./]norm|norm5"),
                        "no conv/linear producer")
ARCHITECTURES = {
    # the default run's three; depthwise-heavy nets get small inputs, as the float64 reference of the
    # per-layer error runs depthwise convs slowly (most of their fold time)
    "resnet18": (112, None),
    "mobilenet_v2": (96, None),
    "shufflenet_v2_x0_5": (64, None),
    "resnet50": (112, None),
    "mobilenet_v3_small": (112, None),
    "efficientnet_b0": (112, None),
    "densenet121": (64, _DENSENET_UNFOLDABLE),
    "regnet_x_400mf": (112, None),
    "googlenet": (112, None),
    "mnasnet0_5": (96, None),
}
DEFAULT_RUN = {"resnet18", "mobilenet_v2", "shufflenet_v2_x0_5"}


def _cases():
    for arch in ARCHITECTURES:
        marks = () if arch in DEFAULT_RUN else (slow,)
        for frontend in ("fx", "onnx"):
            yield pytest.param(arch, frontend, marks=marks, id=f"{arch}-{frontend}")


@functools.lru_cache(maxsize=1)  # the FX and ONNX cases of one architecture share the model
def _model(arch: str, randomize_batchnorms) -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorms(_factories()[arch](), seed=1).eval()


def _batchnorm_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _inputs(side: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(1, 3, side, side, generator=generator) for _ in range(2)]


def _check_structure(report, remaining_bn: int, total_bn: int, unfoldable, tools) -> None:
    folded = tools.fold_bn_records(report, "folded")
    skipped = tools.fold_bn_records(report, "skipped")
    assert len(folded) + len(skipped) == total_bn, "every batch norm of the model must be reported"
    if unfoldable is None:
        assert not skipped, [(r.layer, r.reason) for r in skipped]
    else:
        pattern, reason = unfoldable
        assert skipped, "this architecture has batch norms with nothing to fold into"
        for record in skipped:
            assert pattern.search(record.layer), f"{record.layer} was skipped: {record.reason}"
            assert reason in record.reason, record.reason
        assert len(folded) > len(skipped) / 2
    assert remaining_bn == len(skipped), "batch norms left in the result must be exactly the skipped ones"


@pytest.mark.parametrize("arch, frontend", list(_cases()))
def test_fold_bn_is_exact_on_torchvision(arch, frontend, tools):
    side, unfoldable = ARCHITECTURES[arch]
    model = _model(arch, tools.randomize_batchnorms)
    inputs = _inputs(side)
    total_bn = _batchnorm_count(model)
    assert total_bn > 0

    if frontend == "fx":
        graph = tf.capture(model, inputs[0])
        folded, report = tf.compress(graph, "fold_bn")
        result = folded.to_torch()
        errors = [tools.relative_error(tools.torch_output(model, x), tools.torch_output(result, x)) for x in inputs]
        remaining_bn = tools.count_batchnorm_nodes_fx(result)
        assert not model.training  # the user's module is left as it was
    else:
        path = tools.export_to_onnx(model, inputs[0], "original.onnx")
        assert tools.count_batchnorm_nodes_onnx(onnx.load(path)) == total_bn, "the export must keep its BNs"
        graph = tf.load(path)
        folded, report = tf.compress(graph, "fold_bn")
        out_path = str(tools.tmp_path / "folded.onnx")
        folded.save(out_path)
        saved = onnx.load(out_path)
        onnx.checker.check_model(saved, full_check=True)
        errors = []
        for x in inputs:
            feed = {"input": x.numpy()}
            reference = tools.run_onnxruntime(path, feed)[0]
            assert tools.relative_error(tools.torch_output(model, x), reference) < TOLERANCE  # export sanity
            errors.append(tools.relative_error(reference, tools.run_onnxruntime(out_path, feed)[0]))
        remaining_bn = tools.count_batchnorm_nodes_onnx(saved)

    max_error = max(errors)
    print(f"\nZOO {arch} {frontend} {max_error:.1e} (folded {len(tools.fold_bn_records(report, 'folded'))}"
          f"/{total_bn} BN, {remaining_bn} left)")
    assert np.isfinite(max_error) and max_error < TOLERANCE
    _check_structure(report, remaining_bn, total_bn, unfoldable, tools)
    assert report.output_error_random is not None and report.output_error_random < TOLERANCE
    assert report.params_after < report.params_before
