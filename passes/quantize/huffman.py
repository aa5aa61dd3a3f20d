"""huffman: Huffman-code the cluster indices of the kmeans pass (docs/methods.md#kmeans).

The numbers do not change: the pass marks the graph so that saving as `.tfz` writes
canonical Huffman bitstreams instead of fixed-width indices, and reports per layer the
coded size against fixed-width indices and float32.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from tensorfold.ir.errors import PipelineError
from tensorfold.ir.graph import Graph
from tensorfold.ir.huffman_code import code_lengths, fixed_lengths

from ..registry import PassContext, register
from ..report import LayerRecord, PassReport


def _bytes(bits: int) -> int:
    return (bits + 7) // 8


@register("huffman")
def huffman(graph: Graph, options: dict, context: PassContext) -> tuple[Graph, PassReport]:
    """Entropy coding: a .tfz file stores the kmeans cluster indices Huffman-coded (lossless)."""
    if graph.coding is None:
        raise PipelineError(f"pass 'huffman': {graph.source} has no cluster indices to code; "
                            "run kmeans before it, e.g. \"kmeans, huffman\"")
    report = PassReport("huffman")
    graph = graph.copy()
    graph.coding = dataclasses.replace(graph.coding, huffman=True)
    for record in graph.coding.tensors.values():
        if record.codebook is None:
            continue  # a 16-bit bias: no indices
        started = time.perf_counter()
        indices = record.inlier_indices
        symbols = len(graph.coding.codebooks[record.codebook])
        counts = np.bincount(indices, minlength=symbols)
        coded_bits = int(np.sum(counts * code_lengths(counts)))
        fixed_bits = indices.size * int(fixed_lengths(symbols)[0])
        float_bits = 32 * int(np.prod(record.shape))
        params = int(np.prod(record.shape))
        report.add(LayerRecord(
            record.layer, "coded",
            method=f"indices {_bytes(coded_bits)} B Huffman vs {_bytes(fixed_bits)} B fixed-width "
                   f"vs {_bytes(float_bits)} B float32",
            params_before=params, params_after=params,
            details={"huffman_bytes": _bytes(coded_bits), "fixed_width_bytes": _bytes(fixed_bits),
                     "float32_bytes": _bytes(float_bits), "bits_per_index": coded_bits / max(indices.size, 1),
                     "indices": int(indices.size)},
            seconds=time.perf_counter() - started))
    return graph, report
