"""EVBMF (docs/methods.md#evbmf) recovers the rank and noise level of low-rank-plus-noise matrices."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from tensorfold.ir.errors import PipelineError
from tensorfold.passes.ranks.evbmf import evbmf, weaken


def low_rank_plus_noise(L: int, M: int, rank: int, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # signal singular values well above the noise edge sigma (sqrt(L) + sqrt(M))
    signal = rng.standard_normal((L, rank)) @ rng.standard_normal((rank, M)) * (2 * sigma)
    return signal + sigma * rng.standard_normal((L, M))


@pytest.mark.parametrize("L,M,rank,sigma", [
    (30, 80, 5, 0.1), (80, 30, 5, 0.1),        # both orientations
    (50, 50, 8, 1e-3), (100, 300, 10, 0.5),
    (200, 60, 3, 2.0), (64, 576, 12, 1e-4),    # a conv unfolding with a weight-sized noise level
])
def test_recovers_rank_and_noise_variance(L, M, rank, sigma):
    result = evbmf(low_rank_plus_noise(L, M, rank, sigma, seed=L + M))
    assert result.rank == rank
    assert result.sigma2 == pytest.approx(sigma ** 2, rel=0.15)
    assert result.reliable


def test_orientation_does_not_matter():
    matrix = low_rank_plus_noise(40, 90, 6, 0.3, seed=7)
    wide, tall = evbmf(matrix), evbmf(matrix.T)
    assert wide.rank == tall.rank == 6
    assert wide.sigma2 == pytest.approx(tall.sigma2, rel=1e-8)


def test_shrinkage_and_known_noise():
    matrix = low_rank_plus_noise(40, 60, 4, 0.2, seed=3)
    result = evbmf(matrix, sigma2=0.04)
    values = np.linalg.svd(matrix, compute_uv=False)
    assert result.rank == 4 and result.sigma2 == 0.04
    assert np.all(result.shrunk > 0) and np.all(result.shrunk < values[:4])
    with pytest.raises(PipelineError, match="sigma2"):
        evbmf(matrix, sigma2=-1.0)


def test_pure_noise_has_rank_zero():
    assert evbmf(np.random.default_rng(0).standard_normal((40, 70))).rank == 0


def test_weaken():
    assert weaken(64, 16, 1.0) == 16
    assert weaken(64, 16, 0.0) == 64
    assert weaken(64, 16, 0.8) == 64 - int(0.8 * 48)  # R - 0.8 (R - R_EVBMF), musco
    with pytest.raises(PipelineError, match="weaken"):
        weaken(64, 16, 1.5)


def test_zero_singular_values_are_no_signal_and_raise_no_warning():
    """A trained layer with dead filters: exact zero rows (log(0) made the objective infinite)."""
    rng = np.random.default_rng(3)
    Y = rng.standard_normal((20, 3)) @ rng.standard_normal((3, 60))
    Y[:15] += 0.01 * rng.standard_normal((15, 60))
    Y[15:] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = evbmf(Y)
        assert evbmf(np.zeros((6, 9))).rank == 0
    assert result.rank == 3 and np.all(np.isfinite(result.shrunk))
