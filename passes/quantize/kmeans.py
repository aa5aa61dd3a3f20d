"""kmeans: weight sharing (docs/methods.md#kmeans): conv/linear weights in [-1, 1] become
indices into a k-means codebook; outliers and biases 16-bit uniform. Params are unchanged:
the graph holds the shared values (so it runs as before); a `.tfz` file stores the indices."""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from tensorfold.ir.coding import CodedTensor, WeightCoding, digest
from tensorfold.ir.errors import PipelineError
from tensorfold.ir.graph import Graph, Layer

from .codebook import MAX_CLUSTERS, code_uniform, code_weight, fit_codebook, outlier_mask
from ..measure import layer_error, relative_error
from ..registry import Option, PassContext, register
from ..report import LayerRecord, PassReport

_KINDS = ("conv", "conv_transpose", "linear")


def _usable(graph: Graph, report: PassReport) -> list[Layer]:
    layers = []
    for layer in graph.layers():
        if layer.kind not in _KINDS:
            continue
        if layer.spec is None or layer.unusable:
            report.skip(layer.name, layer.unusable or "unusable")
        else:
            layers.append(layer)
    return layers


@register("kmeans", options={
    "clusters": Option(int, 256, "codebook size, 2..65536; a fixed-width index takes ceil(log2(clusters)) bits"),
    "shared": Option(bool, True, "one codebook for every layer (false: one codebook per layer)"),
})
def kmeans(graph: Graph, options: dict, context: PassContext) -> tuple[Graph, PassReport]:
    """Weight sharing: conv/linear weights in [-1, 1] -> k-means codebook indices; outliers and biases 16-bit."""
    clusters, shared = options["clusters"], options["shared"]
    if not 2 <= clusters <= MAX_CLUSTERS:
        raise PipelineError(f"pass 'kmeans': clusters={clusters} is out of range; a codebook needs 2 to "
                            f"{MAX_CLUSTERS} clusters (indices are 16-bit at most)")
    report = PassReport("kmeans")
    graph = graph.copy()
    layers = _usable(graph, report)
    inliers = [layer.spec.weight[~outlier_mask(layer.spec.weight)] for layer in layers]
    if shared and layers:
        codebooks = [fit_codebook(np.concatenate(inliers), clusters)]
    else:
        codebooks = [fit_codebook(values, clusters) for values in inliers]
    codebooks = tuple(codebooks)
    tensors: dict[str, CodedTensor] = {}
    for i, name in enumerate(layer.name for layer in layers):
        started = time.perf_counter()
        layer = graph.layer(name)  # read again: the previous replacement renamed its neighbours' inputs
        weight = code_weight(name, layer.spec.weight, codebooks[0 if shared else i], 0 if shared else i)
        bias = code_uniform(name, layer.spec.bias) if layer.spec.bias is not None else None
        new_spec = dataclasses.replace(layer.spec, weight=weight.values(codebooks),
                                       bias=bias.values(codebooks) if bias else None)
        err_random, err_calibration = layer_error(graph, [layer], [new_spec], context.inputs)
        graph.replace([name], [new_spec])
        for record in (weight, bias):
            if record is not None:
                tensors[digest(record.values(codebooks))] = record
        params = layer.cost.params
        outliers = int(weight.outlier.sum())
        index_bits = max(1, math.ceil(math.log2(clusters)))
        report.add(LayerRecord(
            name, "replaced", method=f"{clusters} clusters ({'shared' if shared else 'own'} codebook), "
                                     f"{index_bits}-bit indices, {outliers} outliers",
            params_before=params, params_after=params,
            flops_before=layer.cost.flops, flops_after=layer.cost.flops,
            error_random=err_random, error_calibration=err_calibration,
            details={"clusters": clusters, "clusters_used": int(np.unique(weight.inlier_indices).size),
                     "outliers": outliers, "index_bits": index_bits, "outlier_bits": 16, "bias_bits": 16,
                     "weight_error": relative_error(layer.spec.weight, new_spec.weight)},
            seconds=time.perf_counter() - started))
    graph.coding = WeightCoding(codebooks, tensors)
    return graph, report
