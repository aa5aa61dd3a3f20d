"""huffman: optimal code lengths on known distributions, exact round trips, the pass's report and refusal."""
from __future__ import annotations

import heapq
import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

import tensorfold as tf
from tensorfold.ir import huffman_code
from tensorfold.ir.errors import PipelineError


def _optimal_total_bits(counts) -> int:
    """Huffman's cost computed independently: the sum of the weights of every merged node."""
    heap = [int(c) for c in counts if c > 0]
    if len(heap) == 1:
        return heap[0]
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        total += merged
        heapq.heappush(heap, merged)
    return total


def test_dyadic_probabilities_give_minus_log2_p():
    probabilities = np.array([1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 64, 1 / 64, 1 / 32])
    lengths = huffman_code.code_lengths(probabilities * 64)
    assert lengths.tolist() == [-math.log2(p) for p in probabilities]


@pytest.mark.parametrize("seed", range(5))
def test_code_lengths_are_optimal_and_a_complete_prefix_code(seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 1000, size=int(rng.integers(2, 300))) ** rng.integers(1, 4)
    counts[rng.integers(0, len(counts), 3)] = 0  # unused symbols get no code
    lengths = huffman_code.code_lengths(counts)
    assert np.all((lengths == 0) == (counts == 0))
    assert int(np.sum(counts * lengths)) == _optimal_total_bits(counts)
    assert sum(2.0 ** -int(l) for l in lengths if l) == pytest.approx(1.0)  # Kraft equality: nothing wasted
    # Shannon's bound: H <= mean length < H + 1
    p = counts[counts > 0] / counts.sum()
    entropy = float(-np.sum(p * np.log2(p)))
    assert entropy <= np.sum(counts * lengths) / counts.sum() < entropy + 1


def test_canonical_codes_are_prefix_free():
    lengths = huffman_code.code_lengths([40, 30, 10, 10, 5, 3, 1, 1, 0])
    codes = huffman_code.canonical_codes(lengths)
    words = [format(int(c), f"0{int(l)}b") for c, l in zip(codes, lengths) if l]
    assert len(set(words)) == len(words)
    assert not any(a != b and b.startswith(a) for a, b in itertools.permutations(words, 2))


def test_one_symbol_and_fixed_width():
    assert huffman_code.code_lengths([0, 7, 0]).tolist() == [0, 1, 0]
    assert huffman_code.fixed_lengths(256).tolist() == [8] * 256
    assert huffman_code.fixed_lengths(5).tolist() == [3] * 5
    assert huffman_code.fixed_lengths(2).tolist() == [1] * 2


@pytest.mark.parametrize("skewed", [True, False])
def test_exact_round_trip_and_coded_size(skewed):
    rng = np.random.default_rng(3)
    symbols = np.minimum(rng.geometric(0.08, 50_000) - 1, 255) if skewed else rng.integers(0, 256, 50_000)
    counts = np.bincount(symbols, minlength=256)
    for lengths in (huffman_code.code_lengths(counts), huffman_code.fixed_lengths(256)):
        data, bits = huffman_code.encode(symbols, lengths)
        assert bits == int(np.sum(counts * lengths)) and len(data) == (bits + 7) // 8
        assert np.array_equal(huffman_code.decode(data, bits, lengths, len(symbols)), symbols)
    huffman_bits = int(np.sum(counts * huffman_code.code_lengths(counts)))
    if skewed:
        assert huffman_bits < 0.7 * 8 * len(symbols)
    else:
        assert huffman_bits <= 8 * len(symbols)


def test_damaged_streams_and_tables_are_refused():
    symbols = np.arange(10) % 4
    lengths = huffman_code.code_lengths(np.bincount(symbols))
    data, bits = huffman_code.encode(symbols, lengths)
    with pytest.raises(huffman_code.CodeError):
        huffman_code.decode(data[:-1], bits - 8, lengths, len(symbols))
    with pytest.raises(huffman_code.CodeError):
        huffman_code.decode(data, bits, lengths, len(symbols) + 1)
    with pytest.raises(huffman_code.CodeError, match="prefix code"):
        huffman_code.decode(data, bits, np.array([1, 1, 1, 2]), len(symbols))


# ---- the pass ---------------------------------------------------------------------------------------
def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    with torch.no_grad():  # Laplacian weights, as trained weights are: most indices near zero
        for layer in (module[0], module[2]):
            layer.weight.copy_(torch.distributions.Laplace(0.0, 0.05).sample(layer.weight.shape))
    return module


def test_pass_keeps_numbers_and_reports_coded_sizes():
    graph = tf.capture(_mlp(), torch.randn(4, 64))
    clustered, _ = tf.compress(graph, "kmeans")
    coded, report = tf.compress(clustered, "huffman")
    assert coded.coding.huffman and not clustered.coding.huffman
    feed = graph.random_inputs(5)
    assert np.array_equal(clustered.run(feed)["output0"], coded.run(feed)["output0"])
    records = report.passes[0].records
    assert [r.layer for r in records] == ["0", "2"]
    for record in records:
        tensor = next(t for t in coded.coding.tensors.values() if t.layer == record.layer and t.codebook is not None)
        counts = np.bincount(tensor.inlier_indices, minlength=256)
        assert record.details["huffman_bytes"] == (_optimal_total_bits(counts) + 7) // 8
        assert record.details["fixed_width_bytes"] == tensor.inlier_indices.size
        assert record.details["float32_bytes"] == 4 * tensor.indices.size
        assert record.details["huffman_bytes"] < record.details["fixed_width_bytes"]


def test_pass_without_kmeans_is_refused():
    graph = tf.capture(_mlp(), torch.randn(4, 64))
    with pytest.raises(PipelineError, match="run kmeans before it"):
        tf.compress(graph, "huffman")
