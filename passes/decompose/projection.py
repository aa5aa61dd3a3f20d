"""Projections onto low-rank sets, the Z-step of a rank-constrained ADMM (Diao, Han, Chen; the
rank-constrained training of NeRF-like MLPs): the nearest matrix of rank <= r (truncated SVD,
Eckart-Young) and a TT-matrix of inner ranks <= r (TT-SVD rounding, Oseledets 2011: its squared
error is at most the sum over bonds of what each bond's truncation drops)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorly as tl
from tensorly.decomposition import tensor_train_matrix

from tensorfold.ir.specs import TTLinear

from ..equivalent import dense_weight
from .sigma import svd_sigma_factors


def project_rank(matrix: np.ndarray, rank: int) -> np.ndarray:
    """The best rank-`rank` approximation of `matrix` in the Frobenius norm, float64."""
    u, s, vt = np.linalg.svd(np.asarray(matrix, np.float64), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def project_rank_sigma(matrix: np.ndarray, rank: int, sigma: np.ndarray) -> np.ndarray:
    """The rank-`rank` Z nearest `matrix` in the Sigma-norm, tr((M - Z) Sigma (M - Z)^T): U_r U_r^T M with
    U_r the top eigenvectors of M Sigma M^T (SVD-Sigma's closed form)."""
    w1, w2 = svd_sigma_factors(np.asarray(matrix, np.float64), rank, sigma)
    return w2 @ w1


def project_tt(matrix: np.ndarray, ranks: Sequence[int], in_modes: Sequence[int],
               out_modes: Sequence[int]) -> np.ndarray:
    """`matrix` (out x in) rounded to a TT-matrix with the inner ranks `ranks`, as a dense float64 matrix."""
    tensor = np.asarray(matrix, np.float64).reshape(*out_modes, *in_modes)
    with tl.backend_context("numpy"):
        cores = tensor_train_matrix(tensor, rank=[1, *ranks, 1]).factors
    return dense_weight([TTLinear([np.asarray(c) for c in cores], tuple(in_modes), tuple(out_modes), None)])
