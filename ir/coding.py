"""How the kmeans pass coded a graph's weights: codebook indices, 16-bit uniform values.

The kmeans pass builds a `WeightCoding` and sets it on the graph (`Graph.coding`);
saving as `.tfz` (ir/tfz.py) writes it. Decoding (`values`) lives here, in one place,
so the weights the pass puts in the graph and those a `.tfz` file decodes to come from
the same float32 arithmetic: bit-identical.

Records are keyed by a digest of the values they decode to, not by layer or tensor
name: names change when a torch graph is exported to ONNX, values do not. A weight a
later pass rewrote no longer matches, which saving reports.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import numpy as np

UINT16_MAX = 65535


@dataclass(frozen=True)
class Uniform16:
    """Values minimum + q * scale (float32 arithmetic), q uint16, one minimum and scale per tensor."""

    q: np.ndarray
    minimum: np.float32
    scale: np.float32

    def values(self) -> np.ndarray:
        return np.float32(self.minimum) + self.q.astype(np.float32) * np.float32(self.scale)


@dataclass(frozen=True)
class CodedTensor:
    """One tensor of a coded graph.

    With a codebook: values are codebook[indices], except where `outlier` (|w| > 1), which
    hold `uniform`'s 16-bit values. Without one (biases): every value is 16-bit uniform.
    All arrays have the tensor's shape.
    """

    layer: str                           # the layer it came from, for reports and errors
    uniform: Uniform16
    codebook: int | None = None          # index into WeightCoding.codebooks
    indices: np.ndarray | None = None    # uint16
    outlier: np.ndarray | None = None    # bool

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.uniform.q.shape)

    @property
    def inlier_indices(self) -> np.ndarray:
        """The codebook indices of the non-outliers, in C order (what a .tfz file codes)."""
        return self.indices[~self.outlier]

    def values(self, codebooks: tuple[np.ndarray, ...]) -> np.ndarray:
        if self.codebook is None:
            return self.uniform.values()
        return np.where(self.outlier, self.uniform.values(), codebooks[self.codebook][self.indices])

    def transposed(self) -> "CodedTensor":
        """The same coding for the transposed 2-D tensor (an ONNX MatMul stores W.T)."""
        uniform = replace(self.uniform, q=self.uniform.q.T)
        if self.codebook is None:
            return replace(self, uniform=uniform)
        return replace(self, uniform=uniform, indices=self.indices.T, outlier=self.outlier.T)


@dataclass(frozen=True)
class WeightCoding:
    codebooks: tuple[np.ndarray, ...]                               # float32, ascending
    tensors: dict[str, CodedTensor] = field(default_factory=dict)   # by digest(values)
    huffman: bool = False                                           # indices Huffman-coded in a .tfz

    def find(self, array: np.ndarray) -> tuple[str, CodedTensor] | None:
        """The record whose values are exactly `array` (or its transpose), with its key."""
        key = digest(array)
        if key in self.tensors:
            return key, self.tensors[key]
        if np.ndim(array) == 2:
            key = digest(np.transpose(array))
            if key in self.tensors:
                return key, self.tensors[key].transposed()
        return None


def digest(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return hashlib.sha256(repr(array.shape).encode() + array.tobytes()).hexdigest()
