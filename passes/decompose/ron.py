"""Reduced-order network math (Gusak, Daulbaev, Ponomarev, Cichocki, Oseledets: "Reduced-order modeling of
deep neural networks", 2021): a principal basis of each activation, the rows that pin it down, and the
reconstruction from those rows. Pure numpy on arrays; the pass (`passes/ron.py`) builds the network.

An activation z (D values per sample) recorded on calibration data as Z (N x D) lies close to the span of
V, its top R right singular vectors: z ~ V c. Sampling P >= R of its rows, s = S z, gives
c ~ (S V)^+ s and z ~ V (S V)^+ s; the rows are those of a rectangular maximal-volume submatrix of V, which
keeps (S V)^+ small (Mikhalev & Oseledets 2018), so the reconstruction amplifies errors little.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Below this min(N, D) a thin LAPACK SVD is as fast as a randomized one and exact; above it the
# randomized SVD of Halko, Martinsson & Tropp (scikit-learn's) keeps the cost at O(N D R).
EXACT_SVD_LIMIT = 2048


@dataclass
class Basis:
    vectors: np.ndarray          # (D, R), orthonormal columns
    singular_values: np.ndarray  # the top ones, descending (all of them when computed exactly)
    energy: float                # fraction of ||Z||_F^2 the R vectors keep

    @property
    def rank(self) -> int:
        return int(self.vectors.shape[1])


def principal_basis(samples: np.ndarray, rank: int | None = None, energy: float | None = None,
                    seed: int = 0) -> Basis:
    """The top right singular vectors of `samples` (N x D, uncentred: a bias is part of the span).

    `rank` fixes R; `energy` takes the smallest R whose singular values keep that fraction of the
    squared Frobenius norm (at most min(N, D, EXACT_SVD_LIMIT) when the SVD is randomized).
    """
    z = np.asarray(samples, np.float64)
    if (rank is None) == (energy is None):
        raise ValueError("principal_basis: give rank or energy")
    total = float(np.sum(z * z))
    small = min(z.shape)
    if small <= EXACT_SVD_LIMIT:
        values, vectors = _thin_right_svd(z)
        right_t = vectors.T
    else:
        from sklearn.utils.extmath import randomized_svd

        wanted = rank if rank is not None else min(small, EXACT_SVD_LIMIT)
        _, values, right_t = randomized_svd(z, n_components=wanted, n_oversamples=10, random_state=seed)
    if rank is None:
        kept = np.cumsum(values ** 2) / max(total, 1e-300)
        rank = int(min(np.searchsorted(kept, energy - 1e-12) + 1, len(values)))
    rank = max(1, min(rank, len(values)))
    return Basis(right_t[:rank].T.copy(), values[:rank].copy(),
                 float(np.sum(values[:rank] ** 2) / total) if total > 0 else 1.0)


def _thin_right_svd(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Singular values and right singular vectors (D x min(N, D)) of z, exactly: a QR of the tall side first,
    then the SVD of its small triangle (LAPACK's SVD of a wide 416 x 4096 matrix took seconds; this, tenths)."""
    if z.shape[0] < z.shape[1]:
        q, r = np.linalg.qr(z.T)
        left, values, _ = np.linalg.svd(r)
        return values, q @ left
    _, r = np.linalg.qr(z)
    _, values, right_t = np.linalg.svd(r)
    return values, right_t.T


def maxvol(matrix: np.ndarray, tol: float = 1.05, iters: int = 100) -> np.ndarray:
    """R rows of a tall D x R matrix whose square submatrix has (nearly) maximal |det| (Goreinov et al.).

    On return every coefficient of matrix @ inv(matrix[rows]) is at most `tol` in modulus (unless
    `iters` ran out), which bounds the volume within (tol * sqrt(R))^R of the best submatrix's.
    """
    import teneva  # the maxvol kept by Chertkov et al.'s TT library: pure numpy/scipy

    matrix = np.asarray(matrix, np.float64)
    if matrix.shape[0] == matrix.shape[1]:
        return np.arange(matrix.shape[0])
    rows, _ = teneva.maxvol(matrix, e=tol, k=iters)
    return np.asarray(rows, np.int64)


def rect_maxvol(matrix: np.ndarray, tol: float = 1.1, max_rows: int | None = None) -> np.ndarray:
    """P >= R rows of a tall D x R matrix: maxvol, then rows added greedily (Mikhalev & Oseledets 2018)
    until every row of matrix @ pinv(matrix[rows]) has 2-norm at most `tol`, or P reaches `max_rows`.

    With the norms at most `tol`, the rectangular volume sqrt(det(A_I^T A_I)) is within (tol * sqrt(P))^R
    of the best P-row submatrix's (A_J = C_J A_I with ||C_J||_2^2 <= P tol^2).
    """
    import teneva

    matrix = np.asarray(matrix, np.float64)
    n, r = matrix.shape
    if n == r:
        return np.arange(n)
    extra = None if max_rows is None else max(0, min(max_rows, n) - r)
    rows, _ = teneva.maxvol_rect(matrix, e=tol, dr_min=0, dr_max=extra, e0=1.05, k0=100)
    return np.asarray(rows, np.int64)


def reconstruction(basis: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """V (S V)^+ (D x P): from the sampled values s = z[rows] back to z, exact for z in the span of V."""
    basis = np.asarray(basis, np.float64)
    return basis @ np.linalg.pinv(basis[np.asarray(rows)])


def window_rows(sampled: np.ndarray, shape: tuple[int, ...], window: tuple[int, ...]) -> np.ndarray:
    """Rows of the pre-pool activation (flat, C order, per-sample `shape` = (C, *spatial)) that a max-pool with
    kernel = stride = `window` reads for each `sampled` pooled row, member-major: entry m * P + p is
    member m (in C order over the window) of the window of sampled[p]. Pooled sizes are floor(size / window)."""
    channels, spatial = shape[0], tuple(shape[1:])
    pooled = tuple(size // w for size, w in zip(spatial, window))
    coords = np.unravel_index(np.asarray(sampled, np.int64), (channels, *pooled))
    blocks = []
    for member in np.ndindex(*window):
        full = [coords[0]] + [coords[1 + i] * window[i] + member[i] for i in range(len(window))]
        blocks.append(np.ravel_multi_index(tuple(full), (channels, *spatial)))
    return np.concatenate(blocks)
