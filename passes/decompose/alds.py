"""ALDS: k chunks of the input channels, each factored by SVD at rank j (docs/methods.md#alds).

Liebenwein et al., NeurIPS 2021. A conv kernel folds to W = K.reshape(T, S*kh*kw); its
columns are ordered input channel first, so k contiguous column blocks W_1..W_k are k
contiguous chunks of S/k input channels. Each W_i ~ U_i V_i^T at rank j becomes
Conv(S->k*j, the original kernel, stride, padding and dilation, groups=k, no bias) ->
1x1 Conv(k*j->T, bias): group i of the first conv holds V_i^T, the 1x1 conv [U_1 .. U_k].
k = 1 is the SVD conv pair of docs/methods.md#svd. A Linear layer has no grouped form among the specs
(a grouped Linear would need a reshape around it), so it takes k = 1 only.

Error: with E_i = W_i - Ŵ_i, ||[E_1 .. E_k]||_2^2 = ||sum_i E_i E_i^T||_2, hence
    max_i s_{j+1}(W_i) <= ||W - Ŵ||_2 <= sqrt(sum_i s_{j+1}(W_i)^2).
The paper (and torchprune's allocator) uses the left side, max_i, as the layer's error;
it is a lower bound, not an upper one (W = [A, A] at rank j < rank A exceeds it by sqrt(2)).
The right side is a guarantee and equals it at k = 1; the pass allocates on it by default.
"""
from __future__ import annotations

import numpy as np

from tensorfold.ir.specs import Conv, Linear, Spec

from ._common import NotFactorable, as_bias, as_weight, check_rank, gram_svd, no_padding, ones

MAX_CHUNKS = 16  # candidate k: the divisors of S up to this (k in {3, 5, 7, 9} are the paper's seeds)


def check_alds(spec: Spec) -> str | None:
    """Why `spec` cannot be factored by ALDS, or None if it can."""
    if isinstance(spec, Linear):
        return None
    if not isinstance(spec, Conv):
        return f"alds factors Conv and Linear layers, not {type(spec).__name__}"
    if spec.is_depthwise:
        return "depthwise conv: each group is a single filter, nothing to factor"
    if spec.groups > 1:
        return f"grouped conv (groups={spec.groups}): alds folds one dense kernel; not supported"
    if not np.any(spec.weight):
        return "the weight is all zeros"
    return None


def fold(spec: Conv | Linear) -> np.ndarray:
    """The layer as a T x (S*kh*kw) matrix (Linear: out x in), float64."""
    weight = np.asarray(spec.weight, dtype=np.float64)
    return weight.reshape(weight.shape[0], -1)


def chunk_choices(spec: Conv | Linear, limit: int = MAX_CHUNKS) -> list[int]:
    """The k a layer may take: divisors of S up to `limit` (torch grouped convs need equal groups)."""
    if isinstance(spec, Linear):
        return [1]
    return [k for k in range(1, min(limit, spec.in_channels) + 1) if spec.in_channels % k == 0]


def alds_max_rank(spec: Conv | Linear, chunks: int) -> int:
    """Largest useful j: min(T, columns per chunk)."""
    rows, cols = fold_shape(spec)
    return min(rows, cols // chunks)


def fold_shape(spec: Conv | Linear) -> tuple[int, int]:
    return int(spec.weight.shape[0]), int(np.prod(spec.weight.shape[1:]))


def chunk_spectra(matrix: np.ndarray, chunks: int) -> np.ndarray:
    """Singular values of every chunk, (chunks, min(T, cols/chunks)), descending.

    From the eigenvalues of the smaller Gram matrices: 7x faster than an SVD on a 512 x 4608
    fold (0.09 s vs 0.68 s, one thread), and exact to ~1e-8 ||W||, below float32 weights' resolution.
    """
    blocks = np.stack(np.split(np.asarray(matrix, dtype=np.float64), chunks, axis=1))
    grams = blocks @ blocks.transpose(0, 2, 1) if blocks.shape[1] <= blocks.shape[2] else \
        blocks.transpose(0, 2, 1) @ blocks
    return np.sqrt(np.clip(np.linalg.eigvalsh(grams)[:, ::-1], 0.0, None))


def error_bounds(spectra: np.ndarray, norm: float) -> tuple[np.ndarray, np.ndarray]:
    """(upper, lower) relative spectral errors at j = 1..r (index j-1), from `chunk_spectra`.

    upper = sqrt(sum_i s_{j+1}(W_i)^2) / ||W||_2 bounds the error; lower = max_i s_{j+1}(W_i) / ||W||_2
    is the paper's figure (see the module docstring). Both are 0 at full rank.
    """
    tails = np.concatenate([spectra[:, 1:], np.zeros((spectra.shape[0], 1))], axis=1)
    upper = np.sqrt(np.sum(tails ** 2, axis=0)) / norm
    lower = np.max(tails, axis=0) / norm
    return upper, lower


def spectral_norm(matrix: np.ndarray) -> float:
    """||matrix||_2 from the largest eigenvalue of the smaller Gram matrix (accurate to eps*||M||^2)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    gram = matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix
    return float(np.sqrt(max(np.linalg.eigvalsh(gram)[-1], 0.0)))


def _balanced_factors(block: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(S^1/2 V^T, U S^1/2) at `rank` as in svd_factors (docs/methods.md#svd), via the Gram matrix for speed (see chunk_spectra)."""
    left, values, right_t = gram_svd(block, rank)
    root = np.sqrt(values)
    return root[:, None] * right_t, left * root[None, :]


def _require(spec: Spec, chunks: int) -> None:
    reason = check_alds(spec)
    if reason is not None:
        raise NotFactorable(reason)
    valid = chunks == 1 or isinstance(spec, Conv) and chunks >= 1 and spec.in_channels % chunks == 0
    if not valid:
        raise NotFactorable(f"k={chunks} chunks: a Linear takes k=1 and a conv a divisor of its "
                            f"{getattr(spec, 'in_channels', '?')} input channels")


def _realise(spec: Conv | Linear, firsts: list[np.ndarray], seconds: list[np.ndarray]) -> list[Spec]:
    """Factor specs from per-chunk V_i^T (j, cols/k) and U_i (T, j) matrices."""
    if isinstance(spec, Linear):
        return [Linear(as_weight(firsts[0]), None), Linear(as_weight(seconds[0]), as_bias(spec.bias))]
    dims, chunks, rank = spec.spatial_dims, len(firsts), firsts[0].shape[0]
    first_weight = np.concatenate([w.reshape(rank, spec.in_channels // chunks, *spec.kernel_size) for w in firsts])
    second_weight = np.concatenate(seconds, axis=1).reshape(spec.out_channels, chunks * rank, *ones(dims))
    first = Conv(as_weight(first_weight), None, stride=tuple(spec.stride), padding=tuple(spec.padding),
                 dilation=tuple(spec.dilation), groups=chunks)
    second = Conv(as_weight(second_weight), as_bias(spec.bias), stride=ones(dims), padding=no_padding(dims),
                  dilation=ones(dims), groups=1)
    return [first, second]


def alds_specs(spec: Conv | Linear, chunks: int, rank: int) -> list[Spec]:
    """The two factor layers of `spec` with `chunks` input-channel chunks at `rank` each, float32."""
    _require(spec, chunks)
    rank = check_rank(rank, alds_max_rank(spec, chunks), "alds")
    pairs = [_balanced_factors(block, rank) for block in np.split(fold(spec), chunks, axis=1)]
    return _realise(spec, [p[0] for p in pairs], [p[1] for p in pairs])


def alds_layout(spec: Conv | Linear, chunks: int, rank: int) -> list[Spec]:
    """Zero-weight specs with the shapes `alds_specs` would emit (to cost a choice cheaply)."""
    _require(spec, chunks)
    rank = check_rank(rank, alds_max_rank(spec, chunks), "alds")
    rows, cols = fold_shape(spec)
    return _realise(spec, [np.zeros((rank, cols // chunks))] * chunks, [np.zeros((rows, rank))] * chunks)
