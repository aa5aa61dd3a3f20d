"""k-means weight sharing and the 16-bit uniform quantizer, as pure numpy (docs/methods.md#kmeans).

Weights in [-1, 1] become indices into a codebook of k centroids (linear initialisation
over [min, max], then Lloyd iterations); the rest, and biases, are 16-bit uniform.
The results are `ir.coding` records, whose `values()` are what the graph then holds.
"""
from __future__ import annotations

import numpy as np

from tensorfold.ir.coding import UINT16_MAX, CodedTensor, Uniform16

MAX_CLUSTERS = UINT16_MAX + 1  # indices are uint16
INLIER_BOUND = 1.0             # weights in [-1, 1] share the codebook; the rest are outliers


def linear_init(values: np.ndarray, clusters: int) -> np.ndarray:
    """k centroids evenly spaced over [min, max] (Deep Compression's best init: it keeps the rare large weights)."""
    values = np.asarray(values, dtype=np.float64)
    low, high = (values.min(), values.max()) if values.size else (-INLIER_BOUND, INLIER_BOUND)
    return np.linspace(low, high, clusters)


def lloyd_1d(values: np.ndarray, centroids: np.ndarray, max_iterations: int = 300) -> np.ndarray:
    """Lloyd's k-means from `centroids` (ascending), run until no value changes cluster.

    Written out instead of scikit-learn's KMeans because in 1-D each cluster is a run of the
    sorted values between two midpoints: an iteration is one searchsorted and prefix sums,
    O(k log n) rather than O(n k) distances (seconds, not minutes, on ResNet-size layers).
    An empty cluster keeps its centroid, which keeps the centroids in order.
    """
    ordered = np.sort(np.asarray(values, dtype=np.float64).reshape(-1))
    centroids = np.asarray(centroids, dtype=np.float64).copy()
    if not ordered.size:
        return centroids
    prefix = np.concatenate([[0.0], np.cumsum(ordered)])
    previous = None
    for _ in range(max_iterations):
        # cluster j holds the values in (midpoint j-1, midpoint j]: the same tie rule as `nearest`
        edges = np.searchsorted(ordered, (centroids[:-1] + centroids[1:]) / 2, side="right")
        if previous is not None and np.array_equal(edges, previous):
            break
        previous = edges
        starts, ends = np.concatenate([[0], edges]), np.concatenate([edges, [ordered.size]])
        counts = ends - starts
        sums = prefix[ends] - prefix[starts]
        centroids = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
    return centroids


def fit_codebook(values: np.ndarray, clusters: int) -> np.ndarray:
    """The float32 codebook (ascending) of k-means with linear initialisation."""
    centroids = lloyd_1d(values, linear_init(values, clusters))
    return np.sort(centroids.astype(np.float32))


def nearest(values: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index (uint16) of the nearest centroid of an ascending codebook; a tie goes to the lower one."""
    midpoints = (codebook[:-1].astype(np.float64) + codebook[1:]) / 2
    return np.searchsorted(midpoints, np.asarray(values, dtype=np.float64), side="left").astype(np.uint16)


def uniform16(values: np.ndarray) -> Uniform16:
    """16-bit uniform quantization over the tensor's [min, max]: error at most half a step (max-min)/65535."""
    values = np.asarray(values, dtype=np.float32)
    if not values.size:
        return Uniform16(np.zeros(values.shape, np.uint16), np.float32(0), np.float32(0))
    low = np.float32(values.min())
    scale = np.float32((float(values.max()) - float(low)) / UINT16_MAX)
    steps = (values.astype(np.float64) - float(low)) / float(scale) if scale > 0 else np.zeros(values.shape)
    return Uniform16(np.clip(np.rint(steps), 0, UINT16_MAX).astype(np.uint16), low, scale)


def outlier_mask(weight: np.ndarray) -> np.ndarray:
    return np.abs(weight) > INLIER_BOUND


def code_weight(layer: str, weight: np.ndarray, codebook: np.ndarray, codebook_id: int) -> CodedTensor:
    """A weight as codebook indices, its outliers (|w| > 1) 16-bit uniform over their own [min, max]."""
    weight = np.asarray(weight, dtype=np.float32)
    outlier = outlier_mask(weight)
    indices = np.zeros(weight.shape, dtype=np.uint16)
    indices[~outlier] = nearest(weight[~outlier], codebook)
    fitted = uniform16(weight[outlier])
    q = np.zeros(weight.shape, dtype=np.uint16)
    q[outlier] = fitted.q
    return CodedTensor(layer, Uniform16(q, fitted.minimum, fitted.scale), codebook_id, indices, outlier)


def code_uniform(layer: str, values: np.ndarray) -> CodedTensor:
    """A tensor (a bias) kept whole as 16-bit uniform."""
    return CodedTensor(layer, uniform16(values))
