"""kmeans: the 1-D k-means and 16-bit quantizer against independent computations, then the pass
on FX and ONNX graphs (codebook size, index range, outliers, biases, report) and where it refuses."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from torch import nn

import tensorfold as tf
from tensorfold.ir.errors import PipelineError
from tensorfold.passes.quantize.codebook import fit_codebook, linear_init, lloyd_1d, nearest, uniform16


class Small(nn.Module):
    """conv (bias, weights scaled so many lie outside [-1, 1]) -> conv1x1 (no bias) -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 1, bias=False)
        self.fc = nn.Linear(4 * 8 * 8, 10)
        with torch.no_grad():
            self.conv1.weight.mul_(8.0)
            self.conv1.bias.mul_(5.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.conv2(torch.relu(self.conv1(x)))), 1))


EXAMPLE = torch.randn(2, 3, 8, 8)


def _weights(graph) -> dict[str, np.ndarray]:
    return {layer.name: layer.spec.weight for layer in graph.layers() if layer.kind in ("conv", "linear")}


# ---- the math ---------------------------------------------------------------------------------------
def test_lloyd_1d_matches_scikit_learn_from_the_same_linear_init():
    values = np.random.default_rng(0).laplace(0, 0.2, 5000).clip(-1, 1)
    init = linear_init(values, 16)
    assert init[0] == values.min() and init[-1] == values.max() and np.allclose(np.diff(init), np.diff(init)[0])
    reference = KMeans(16, init=init.reshape(-1, 1), n_init=1, tol=0, max_iter=300, algorithm="lloyd")
    reference.fit(values.reshape(-1, 1))
    np.testing.assert_allclose(lloyd_1d(values, init), np.sort(reference.cluster_centers_.ravel()), atol=1e-9)


def test_nearest_is_the_argmin_of_the_distance():
    rng = np.random.default_rng(1)
    codebook = np.sort(rng.uniform(-1, 1, 32)).astype(np.float32)
    values = rng.uniform(-1, 1, 2000).astype(np.float32)
    brute = np.argmin(np.abs(values[:, None].astype(np.float64) - codebook[None, :]), axis=1)
    assert np.array_equal(nearest(values, codebook), brute)


def test_uniform16_keeps_half_a_step_of_precision():
    values = np.random.default_rng(2).uniform(-7, 3, 1000).astype(np.float32)
    coded = uniform16(values)
    step = (float(values.max()) - float(values.min())) / 65535
    assert coded.q.dtype == np.uint16 and coded.q.min() == 0 and coded.q.max() == 65535
    assert np.max(np.abs(coded.values() - values)) <= step / 2 * 1.01
    constant = uniform16(np.full(5, 0.25, np.float32))
    assert np.array_equal(constant.values(), np.full(5, 0.25, np.float32))


# ---- the pass -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("front", ["fx", "onnx"])
def test_shared_codebook_indices_outliers_and_biases(front, tools):
    torch.manual_seed(0)
    module = Small().eval()
    graph = tf.capture(module, EXAMPLE) if front == "fx" else tf.load(tools.export_to_onnx(module, EXAMPLE))
    original = _weights(graph)
    coded, report = tf.compress(graph, "kmeans(clusters=16)")

    coding = coded.coding
    assert graph.coding is None, "the input graph must not be touched"
    assert len(coding.codebooks) == 1 and coding.codebooks[0].shape == (16,)
    codebook = coding.codebooks[0].astype(np.float64)
    inliers = np.concatenate([w[np.abs(w) <= 1] for w in original.values()])
    # linear initialisation over [min, max] of the pooled inliers, then Lloyd: scikit-learn from that init agrees
    reference = KMeans(16, init=np.linspace(inliers.min(), inliers.max(), 16).reshape(-1, 1), n_init=1, tol=0,
                       max_iter=300, algorithm="lloyd").fit(inliers.reshape(-1, 1).astype(np.float64))
    np.testing.assert_allclose(codebook, np.sort(reference.cluster_centers_.ravel()), atol=1e-6)

    records = {r.layer: r for r in report.passes[0].records}
    assert sorted(records) == sorted(original)
    for (name, before), after in zip(original.items(), _weights(coded).values()):
        outlier = np.abs(before) > 1
        nearest_centroid = codebook[np.argmin(np.abs(before[~outlier, None] - codebook[None, :]), axis=1)]
        assert np.array_equal(after[~outlier], nearest_centroid.astype(np.float32)), name
        if outlier.any():
            step = (before[outlier].max() - before[outlier].min()) / 65535
            assert np.max(np.abs(after[outlier] - before[outlier])) <= step / 2 * 1.01 + 1e-7, name
        record = records[name]
        assert record.details["outliers"] == int(outlier.sum())
        assert record.details["index_bits"] == 4 and record.details["clusters"] == 16
        assert record.params_before == record.params_after
        assert record.error_random is not None and record.error_random > 0
        expected = np.linalg.norm(before.astype(np.float64) - after) / np.linalg.norm(before.astype(np.float64))
        assert record.details["weight_error"] == pytest.approx(expected, rel=1e-6)
    assert records[next(iter(original))].details["outliers"] > 0  # conv1's weights were scaled up

    coded_weights = [r for r in coding.tensors.values() if r.codebook is not None]
    assert all(r.indices.dtype == np.uint16 and r.inlier_indices.max() < 16 for r in coded_weights)
    for layer_before, layer_after in zip(graph.layers(), coded.layers()):  # same order, renamed in ONNX
        before = layer_before.spec.bias
        assert (before is None) == (layer_after.spec.bias is None)
        if before is not None:
            step = (before.max() - before.min()) / 65535
            assert np.max(np.abs(layer_after.spec.bias - before)) <= step / 2 * 1.01 + 1e-7
    assert report.params_before == report.params_after
    # lossy (a shared 16-entry codebook flattens the small fc weights), but the figure reported is the one measured
    feeds = [graph.random_inputs(seed) for seed in (0, 1)]
    pairs = [(graph.run(f)[graph.output_names[0]], coded.run(f)[coded.output_names[0]]) for f in feeds]
    assert report.output_error_random == pytest.approx(tools.pooled_relative_error(pairs), rel=1e-4)


def test_per_layer_codebooks(tools):
    torch.manual_seed(0)
    graph = tf.capture(Small().eval(), EXAMPLE)
    coded, _ = tf.compress(graph, "kmeans(clusters=8, shared=false)")
    weights = _weights(graph)
    assert len(coded.coding.codebooks) == len(weights)
    for (name, weight), codebook in zip(weights.items(), coded.coding.codebooks):
        inliers = weight[np.abs(weight) <= 1]
        assert codebook.shape == (8,)
        np.testing.assert_allclose(codebook, fit_codebook(inliers, 8))
        assert inliers.min() <= codebook.min() and codebook.max() <= inliers.max(), name


@pytest.mark.parametrize("clusters", [1, 0, -3, 65537])
def test_clusters_out_of_range_is_refused(clusters):
    graph = tf.capture(Small().eval(), EXAMPLE)
    with pytest.raises(PipelineError, match=f"clusters={clusters}.*2 to 65536"):
        tf.compress(graph, f"kmeans(clusters={clusters})")
