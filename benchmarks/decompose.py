"""Decomposition benchmark: wall time, params / FLOPs ratios and output error per method, whole models.

    python benchmarks/decompose.py                       # ResNet-18 and VGG-16 at 224, every method
    python benchmarks/decompose.py --models resnet18 --methods "tucker2(rank=evbmf)" --input-size 224

Random weights have no low-rank structure (EVBMF rightly keeps them at full rank), so by
default every model is also measured with `--weights planted`: each conv / linear weight
replaced by a low-rank one (ranks 1/4 of each side) plus 1% noise, the structure trained
weights have. Figures are measured in one run on this machine; ratios are what to compare.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torchvision
from torch import nn

import tensorfold as tf

DEFAULT_METHODS = [
    "tucker2(rank=evbmf)",
    "tucker2(ratio=2)",
    "svd(ratio=2)",
    "spatial_svd(ratio=2)",
    "cp(ratio=4, include={convs3x3})",
    "cp(ratio=4, method=epc, include={convs3x3})",
    "tt(rank=16)",  # ratio=4 keeps TT ranks so high (238 on VGG's fc6) that the chain costs more FLOPs
]


# `{convs3x3}` in a method stands for the model's 3x3 convs (CP is the method for them)
CONVS_3X3 = {"resnet18": "layer*.conv*", "vgg16": "features.*"}


def plant_low_rank(model: nn.Module, seed: int = 0) -> None:
    """Every conv / linear weight gets Tucker-2 (conv) or matrix (linear) rank 1/4 + 1% noise."""
    rng = np.random.default_rng(seed)
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.groups == 1 and module.in_channels >= 16:
            t, s = module.out_channels, module.in_channels
            rt, rs = max(t // 4, 1), max(s // 4, 1)
            core = rng.standard_normal((rt, rs, *module.kernel_size))
            kernel = np.einsum("ab,bcij,dc->adij", rng.standard_normal((t, rt)), core, rng.standard_normal((s, rs)),
                               optimize=True)  # unoptimised einsum loops for minutes on 512 channels
        elif isinstance(module, nn.Linear):
            out, inp = module.weight.shape
            r = max(min(out, inp) // 4, 1)
            kernel = rng.standard_normal((out, r)) @ rng.standard_normal((r, inp))
        else:
            continue
        kernel += 0.01 * kernel.std() * rng.standard_normal(kernel.shape)
        kernel *= module.weight.detach().numpy().std() / kernel.std()
        module.weight.data = torch.from_numpy(kernel.astype(np.float32))


def planted_graph(arch: str, size: int):
    """torchvision:<arch> with plant_low_rank's weights, captured at 1 x 3 x size x size."""
    module = torchvision.models.get_model(arch, weights=None).eval()
    plant_low_rank(module)
    return tf.capture(module, torch.randn(1, 3, size, size), source=f"torchvision:{arch} (planted)")


def run(model_name: str, weights: str, methods: list[str], size: int) -> list[dict]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name, weights=None).eval()
    if weights == "planted":
        plant_low_rank(model)
    graph = tf.capture(model, torch.randn(1, 3, size, size))
    graph, _ = tf.compress(graph, "fold_bn")
    rows = []
    for method in methods:
        method = method.replace("{convs3x3}", CONVS_3X3.get(model_name, "*"))
        started = time.perf_counter()
        _, report = tf.compress(graph, method, progress=sys.stderr.isatty())
        seconds = time.perf_counter() - started
        changed = report.passes[0].changed
        decompose_seconds = sum(r.seconds for r in changed)
        errors = [r.error_random for r in changed if r.error_random is not None]
        rows.append({
            "model": model_name, "weights": weights, "method": method, "layers_factored": len(changed),
            "seconds": round(seconds, 2), "seconds_in_layers": round(decompose_seconds, 2),
            "params_ratio": report.params_before / report.params_after,
            "flops_ratio": report.flops_before / report.flops_after,
            "mean_layer_error": float(np.mean(errors)) if errors else 0.0,
            "output_error": report.output_error_random,
        })
        print(f"  {model_name:9s} {weights:7s} {method:55s} {len(changed):3d} layers {seconds:7.1f} s "
              f"params {rows[-1]['params_ratio']:.2f}x FLOPs {rows[-1]['flops_ratio']:.2f}x "
              f"layer err {rows[-1]['mean_layer_error']:.3f} output err {report.output_error_random:.3f}", flush=True)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,vgg16")
    parser.add_argument("--weights", default="random,planted", help="random, planted, or both")
    parser.add_argument("--methods", nargs="*", default=DEFAULT_METHODS)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--json", default="benchmarks/decompose.json")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    print(f"torch threads: {torch.get_num_threads()}, cpu count: {os.cpu_count()}")
    rows = []
    for model_name in args.models.split(","):
        for weights in args.weights.split(","):
            rows += run(model_name, weights, args.methods, args.input_size)
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
