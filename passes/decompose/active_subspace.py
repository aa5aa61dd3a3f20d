"""Active subspace of a network's loss at one layer (Cui, Garcia et al., "Active subspace of neural networks:
structural analysis and universal attacks", SIMODS 2020). Pure math, no graph code.

With g_i = dL/dz (the loss gradient with respect to the layer's output z for sample i), the matrix
C = (1/N) sum_i g_i g_i^T says in which directions of z the loss changes: its top-r eigenvectors V_r span
the active subspace, and z -> V_r^T z keeps what the rest of the network needs. C = G^T G / N for the
N x D gradient matrix G, so V_r are G's top right singular vectors (C itself, D x D, is never formed)
and C's eigenvalues are sigma_i^2 / N.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tensorfold.ir.errors import PipelineError


@dataclass
class ActiveSubspace:
    basis: np.ndarray        # D x r, orthonormal columns: the top-r eigenvectors of C
    eigenvalues: np.ndarray  # all of C's nonzero eigenvalues (at most min(N, D)), descending

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])

    @property
    def energy(self) -> float:
        """The fraction of C's trace (the mean squared gradient norm) that the basis keeps."""
        total = float(self.eigenvalues.sum())
        return float(self.eigenvalues[:self.rank].sum() / total) if total > 0 else 1.0


def active_subspace(gradients: np.ndarray, rank: int | None = None, energy: float | None = None) -> ActiveSubspace:
    """The active subspace of N x D per-sample gradients, at `rank`, or at the smallest rank whose
    eigenvalues keep a fraction `energy` of C's trace."""
    g = np.asarray(gradients, dtype=np.float64)
    if g.ndim != 2 or not len(g):
        raise PipelineError(f"active subspace: gradients must be N x D with N >= 1, got shape {g.shape}")
    if (rank is None) == (energy is None):
        raise PipelineError("active subspace: give rank= or energy=")
    _, sigma, vt = np.linalg.svd(g, full_matrices=False)
    eigenvalues = sigma ** 2 / len(g)
    if rank is None:
        if not 0 < energy <= 1:
            raise PipelineError(f"active subspace: energy={energy} must lie in (0, 1]")
        kept = np.cumsum(eigenvalues) / max(float(eigenvalues.sum()), 1e-300)
        rank = int(np.searchsorted(kept, energy - 1e-12) + 1)
    if not 1 <= rank <= len(sigma):
        raise PipelineError(f"active subspace: rank={rank} must lie in 1..{len(sigma)} "
                            f"(min of {len(g)} gradient samples and the layer's width {g.shape[1]})")
    return ActiveSubspace(vt[:rank].T.copy(), eigenvalues)
