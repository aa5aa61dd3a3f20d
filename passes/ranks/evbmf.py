"""Empirical variational Bayes matrix factorisation rank estimate (Nakajima et al., JMLR 2013).

Implements docs/methods.md#evbmf step by step, as in the reference code used by musco
(`rank_estimation/vbmf.py`), with two fixes: the matrix is transposed so that L <= M (the
reference silently assumes it), and sigma^2 is searched over log(sigma^2) so that Brent's
absolute tolerance stays relative: conv weights have noise levels of 1e-6 and below, far
under scipy's default xatol of 1e-5 on sigma^2 itself.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy.optimize import minimize_scalar

from tensorfold.ir.errors import PipelineError

TAU_BAR_SCALE = 2.5129  # tau_bar = 2.5129 sqrt(alpha) (docs/methods.md#evbmf)


class EVBMFResult(NamedTuple):
    rank: int               # #{gamma_h > sigma sqrt(M x_bar)}
    sigma2: float           # noise variance, estimated unless given
    shrunk: np.ndarray      # EVB estimates of the top `rank` singular values (docs/methods.md#evbmf)
    reliable: bool          # False when the sigma^2 search bounds were inverted (small matrices)


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    shifted = x - 1 - alpha
    return 0.5 * (shifted + np.sqrt(np.maximum(shifted ** 2 - 4 * alpha, 0.0)))


def _objective(sigma2: float, values2: np.ndarray, residual: float, L: int, M: int, x_bar: float) -> float:
    """Omega(sigma^2) of docs/methods.md#evbmf (the negative free energy up to constants)."""
    alpha, H = L / M, values2.size
    x = values2 / (M * sigma2)
    above = x[x > x_bar]
    tau = _tau(above, alpha)
    psi0 = np.sum(x - np.log(x))
    psi1 = np.sum(np.log(tau + 1) + alpha * np.log(tau / alpha + 1) - tau)
    return float(psi0 + psi1 + residual / (M * sigma2) + (L - H) * math.log(sigma2))


def evbmf(matrix: np.ndarray, sigma2: float | None = None, H: int | None = None) -> EVBMFResult:
    """EVBMF rank, noise variance and shrunk singular values of `matrix` (either orientation)."""
    Y = np.asarray(matrix, dtype=np.float64)
    if Y.ndim != 2 or min(Y.shape) < 1:
        raise PipelineError(f"evbmf needs a non-empty matrix, got shape {Y.shape}")
    if Y.shape[0] > Y.shape[1]:
        Y = Y.T  # the derivation assumes L <= M (docs/methods.md#evbmf)
    L, M = Y.shape
    H = L if H is None else min(int(H), L)
    alpha = L / M
    tau_bar = TAU_BAR_SCALE * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)

    # singular values from the L x L Gram matrix: ~10x faster than an SVD of a wide unfolding
    # (512 x 4608 here), and precise enough for a rank threshold
    gram_eigenvalues = np.linalg.eigvalsh(Y @ Y.T)[::-1]
    values = np.sqrt(np.clip(gram_eigenvalues, 0.0, None))[:H]
    # zero singular values (dead filters of a trained layer, an exactly low-rank matrix) carry no
    # signal: their x - log(x) term is a constant in sigma^2 except for log(sigma^2), which the
    # (L - H) term counts once they are left out of H; kept, log(0) made Omega infinite
    values = values[values > (values[0] if values.size else 0.0) * np.finfo(np.float64).eps ** 0.5]
    H = values.size
    values2 = values ** 2
    residual = max(float(np.sum(Y ** 2) - np.sum(values2)), 0.0)
    reliable = True
    if sigma2 is None:
        upper = (np.sum(values2) + residual) / (L * M)
        if upper <= 0 or H == 0:
            return EVBMFResult(0, 0.0, np.zeros(0), False)
        h_bar = min(math.ceil(L / (1 + alpha)) - 1, H - 1)  # 1-based h_bar, capped so gamma_{h_bar+1} exists
        lower = max(values2[h_bar] / (M * x_bar), float(np.mean(values2[h_bar:])) / M)
        if not lower < upper:
            # small matrices: the bounds cross and the estimate is unreliable (docs/methods.md#evbmf)
            reliable = False
            lower, upper = sorted((lower, upper))
            lower = lower if lower < upper else upper * (1 - 1e-6)
        floor = upper * 1e-300 ** 0.5  # keep log() finite when the matrix is exactly low rank
        log_bounds = (math.log(max(lower, floor)), math.log(upper))
        found = minimize_scalar(lambda t: _objective(math.exp(t), values2, residual, L, M, x_bar),
                                bounds=log_bounds, method="bounded", options={"xatol": 1e-10})
        sigma2 = math.exp(found.x)
    elif not sigma2 > 0:
        raise PipelineError(f"evbmf: sigma2 must be positive, got {sigma2}")

    threshold = math.sqrt(M * sigma2 * x_bar)
    rank = int(np.sum(values > threshold))
    kept = values[:rank]
    ratio = (L + M) * sigma2 / kept ** 2
    shrunk = kept / 2 * (1 - ratio + np.sqrt(np.maximum((1 - ratio) ** 2 - 4 * L * M * sigma2 ** 2 / kept ** 4, 0.0)))
    return EVBMFResult(rank, float(sigma2), shrunk, reliable)


def weaken(full_rank: int, evbmf_rank: int, factor: float) -> int:
    """musco's weakening R - factor (R - R_EVBMF) (docs/methods.md#evbmf): factor 1 keeps the EVBMF rank,
    0 keeps the full rank. The removed part is rounded down, so the rank rounds up."""
    if not 0.0 <= factor <= 1.0:
        raise PipelineError(f"evbmf weaken factor must be in [0, 1], got {factor}")
    return int(full_rank - math.floor(factor * (full_rank - evbmf_rank) + 1e-9))
