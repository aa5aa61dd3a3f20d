"""A held-out zoo, end to end: capture -> fold_bn -> SVD at full rank -> int8 -> x86 build (untuned).

Models none of the passes were written against: the ONNX model zoo's "light" graphs that the
`onnx` wheel ships (opset 9, IR 3, weights computed by ConstantOfShape nodes, initializers listed
as graph inputs), torchvision's ViT and Swin (transformer linears; Swin pads by computed amounts)
and detection / segmentation backbones (several outputs, an FPN). Each case ends "handled" (every
step ran and each exact step was exact) or "refused" (a TensorfoldError naming the model and what
is wrong, listed in REFUSED with its reason); anything else fails. Each prints one line,
`ZOO-E2E <case> handled|refused ...` (run with `pytest -s`).
"""
from __future__ import annotations

import os
import re

import numpy as np
import onnx
import pytest
import torch
import torchvision
from torchvision.models import SwinTransformer, VisionTransformer
from torchvision.models.detection.backbone_utils import mobilenet_backbone

import tensorfold as tf

EXACT = 1e-4          # fold_bn and full-rank SVD are exact up to float32 rounding
INT8_BUILD = 0.01     # slack of TVM's int8 error over onnxruntime's, both against the float model
LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
slow = pytest.mark.slow


def _light(name: str):
    return lambda: tf.load(os.path.join(LIGHT, f"light_{name}.onnx"))


def _torch(factory, side: int):
    def capture():
        torch.manual_seed(0)
        model = factory().eval()
        with torch.no_grad():  # ViT's head starts at zero: its output would be all zeros
            for parameter in model.parameters():
                if not parameter.any():
                    parameter.normal_(0, 0.05)
        return tf.capture(model, (torch.randn(1, 3, side, side),))
    return capture


CASES = {
    # name: (graph factory, in the default run)
    "light-squeezenet": (_light("squeezenet"), True),
    "light-resnet50": (_light("resnet50"), False),
    "light-shufflenet": (_light("shufflenet"), False),
    "light-inception_v1": (_light("inception_v1"), False),
    "light-inception_v2": (_light("inception_v2"), False),
    "light-densenet121": (_light("densenet121"), False),
    "light-bvlc_alexnet": (_light("bvlc_alexnet"), False),
    "light-zfnet512": (_light("zfnet512"), False),
    "light-vgg19": (_light("vgg19"), False),
    "vit-tiny": (_torch(lambda: VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                  hidden_dim=32, mlp_dim=64, num_classes=10), 32), True),
    "swin-tiny": (_torch(lambda: SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                                 window_size=[4, 4], num_classes=10), 32), True),
    "fpn-mobilenet_v3_small": (_torch(lambda: mobilenet_backbone(backbone_name="mobilenet_v3_small", fpn=True,
                                                                 weights=None, trainable_layers=6), 64), True),
    "vit_b_16": (_torch(lambda: torchvision.models.vit_b_16(weights=None), 224), False),
    "swin_t": (_torch(lambda: torchvision.models.swin_t(weights=None), 224), False),
    "lraspp_mobilenet_v3_large": (_torch(lambda: torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=4), 128), False),
}
# case -> what its refusal must say (none so far: every case above is handled)
REFUSED: dict[str, str] = {}


def _params():
    for name, (_, default) in CASES.items():
        yield pytest.param(name, id=name, marks=() if default else (slow,))


def _relative_errors(reference: dict, value: dict) -> list[float]:
    errors = []
    for name, expected in reference.items():
        norm = float(np.linalg.norm(expected))
        assert norm > 0, f"output {name} is all zeros: the comparison would say nothing"
        errors.append(float(np.linalg.norm(np.asarray(expected, np.float64) - value[name]) / norm))
    return errors


def _pipeline(name: str, tmp_path) -> str:
    graph = CASES[name][0]()
    feeds = [graph.random_inputs(seed) for seed in range(2)]
    reference = graph.run(feeds[0])

    factored, report = tf.compress(graph, "fold_bn, svd(energy=1.0, force=true)")
    assert max(_relative_errors(reference, factored.run(feeds[0]))) < EXACT
    assert report.output_error_random is not None and report.output_error_random < EXACT
    replaced = [r for p in report.passes if p.name == "svd" for r in p.records if r.action == "replaced"]
    assert replaced, "full-rank SVD replaced no layer"
    assert report.params_before > 0

    quantized, int8_report = tf.compress(factored, "int8", calibration=feeds)
    assert [r for r in int8_report.passes[0].records if r.action == "quantized"]
    # the reported whole-model error is the true one (pooled over the same random feeds and outputs)
    num = den = 0.0
    for feed in feeds:
        before, after = factored.run(feed), quantized.run(feed)
        for out_before, out_after in zip(factored.output_names, quantized.output_names):
            num += float(np.sum((before[out_before].astype(np.float64) - after[out_after]) ** 2))
            den += float(np.sum(before[out_before].astype(np.float64) ** 2))
    assert int8_report.output_error_random == pytest.approx(np.sqrt(num / den), rel=1e-3)

    artifact = tf.build(quantized, "x86", tmp_path / "x86", progress=False)
    # TVM's int8 and onnxruntime's round differently (a few % on a transformer); each is judged
    # against the float model: TVM's error within the order of onnxruntime's (a wrong lowering is ~100 %)
    float_outputs = factored.run(feeds[0])
    ort_errors = _relative_errors(float_outputs, quantized.run(feeds[0]))
    tvm_errors = _relative_errors(float_outputs, artifact.load()(**feeds[0]))
    for tvm_error, ort_error in zip(tvm_errors, ort_errors):
        assert tvm_error < 2 * ort_error + INT8_BUILD
    return (f"handled: {len(replaced)} layers factored, {len(artifact.manifest['int8']['int8_ops'])} int8 ops, "
            f"int8 output error {int8_report.output_error_random:.3f}")


@pytest.mark.parametrize("name", list(_params()))
def test_held_out_zoo_end_to_end(name, tmp_path):
    try:
        outcome = _pipeline(name, tmp_path)
    except tf.TensorfoldError as e:
        assert name in REFUSED, f"{name} was refused: {e}"
        assert re.search(REFUSED[name], str(e)), str(e)
        outcome = f"refused: {e}"
    else:
        assert name not in REFUSED, f"{name} is listed as refused but went through"
    print(f"\nZOO-E2E {name} {outcome}")
