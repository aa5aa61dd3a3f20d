"""CPD-EPC: CP with minimal sensitivity at the ALS error (Phan et al., ECCV 2020; docs/methods.md#cp).

Degenerate ALS solutions hold large rank-1 terms that cancel each other; fine-tuning such
layers is unstable. EPC keeps the ALS error delta = ||K - K_ALS|| as a bound and minimises the
sensitivity ss = sum_n tr(hadamard_{k != n} A_k^T A_k) under ||K - [[A_1..A_N]]|| <= delta.

Block update (one factor A, others rescaled to unit-norm columns, so ss = (N-1)||A||^2 + const
for N = 3): min ||A||^2 s.t. ||Y - A Z^T||^2 <= delta^2 with Y the unfolding, Z the
Khatri-Rao product of the others, G = YZ, Gamma = Z^T Z = Q diag(e) Q^T. Closed form
A = G (Gamma + mu I)^-1 where mu >= 0 solves
    ||Y||^2 - sum_j ||(GQ)_j||^2 (e_j + 2 mu) / (e_j + mu)^2 = delta^2,
whose left side is increasing in mu, so bisection finds it. Sweeps stop when ||lambda||^2
stabilises. Written for any order N (CP3 is the paper's case; CP4 works the same way).
G = YZ is an MTTKRP: computed by `cp_als.mttkrp` without forming Z (1.2 GB for a
512x512x3x3 kernel at rank 570), and ||Y||^2 = ||K||^2 for every mode.
"""
from __future__ import annotations

import numpy as np
import tensorly as tl

from tensorfold.ir.errors import PipelineError

from .cp import CPFactors, cp_als
from .als_einsum import PartialCache, hadamard_gram, mttkrp

_BISECTION_STEPS = 200


def sensitivity(factors: list[np.ndarray], weights: np.ndarray | None = None) -> float:
    """ss = sum_n tr(hadamard_{k != n} A_k^T A_k) = sum_r sum_n prod_{k != n} ||a_r^(k)||^2.

    `weights`, if given, are folded into the first factor. ss depends on how each column's
    scale is spread over the factors; compare CPs after `balance` for a scale-free measure.
    """
    factors = [np.asarray(f, dtype=np.float64) for f in factors]
    if weights is not None:
        factors[0] = factors[0] * np.asarray(weights, dtype=np.float64)[None, :]
    squared_norms = np.stack([np.sum(f ** 2, axis=0) for f in factors])  # (N, R)
    total = 0.0
    for n in range(len(factors)):
        total += float(np.sum(np.prod(np.delete(squared_norms, n, axis=0), axis=0)))
    return total


def balance(weights: np.ndarray, factors: list[np.ndarray]) -> list[np.ndarray]:
    """The same CP with each component's scale spread evenly over the N factors.

    For a fixed product of column norms, even norms minimise ss (AM-GM), so this is the
    representation in which the sensitivities of two CPs are comparable.
    """
    factors = [np.asarray(f, dtype=np.float64) for f in factors]
    norms = np.stack([np.linalg.norm(f, axis=0) for f in factors])
    scale = np.abs(np.asarray(weights, dtype=np.float64)) * np.prod(norms, axis=0)
    share = scale ** (1.0 / len(factors))
    signs = np.sign(weights)
    out = []
    for n, (f, f_norms) in enumerate(zip(factors, norms)):
        unit = np.divide(f, f_norms[None, :], out=np.zeros_like(f), where=f_norms[None, :] > 0)
        out.append(unit * (share * (signs if n == 0 else 1.0))[None, :])
    return out


def _constrained_least_norm(y_norm2: float, gram: np.ndarray, product: np.ndarray, bound2: float) -> np.ndarray:
    """min ||A||^2 s.t. ||Y - A Z^T||^2 <= bound2, given Gamma = Z^T Z and G = Y Z (docs/methods.md#cp)."""
    eigvals, eigvecs = np.linalg.eigh(gram)
    eigvals = np.clip(eigvals, 0.0, None)
    rotated = product @ eigvecs
    weights = np.sum(rotated ** 2, axis=0)
    floor = 1e-12 * max(float(eigvals.max()), 1e-300)

    def error2(mu: float) -> float:
        denom = eigvals + mu
        safe = denom > floor  # a null direction of Gamma has G q_j = 0 too: no contribution
        return y_norm2 - float(np.sum(weights[safe] * (eigvals[safe] + 2 * mu) / denom[safe] ** 2))

    bound2 = min(bound2, y_norm2 * (1 - 1e-12))
    if error2(0.0) >= bound2:
        mu = 0.0  # the least-squares solution is already on (or past) the bound
    else:
        low, high = 0.0, max(float(eigvals.max()), 1e-12)
        for _ in range(_BISECTION_STEPS):  # error2 -> ||Y||^2 > bound2 as mu grows: a bracket exists
            if error2(high) >= bound2:
                break
            low, high = high, 2 * high
        for _ in range(_BISECTION_STEPS):
            middle = 0.5 * (low + high)
            if middle in (low, high):
                break
            low, high = (middle, high) if error2(middle) < bound2 else (low, middle)
        mu = low  # the feasible side of the bracket
    denom = eigvals + mu
    inverse = np.divide(1.0, denom, out=np.zeros_like(denom), where=denom > floor)
    return (rotated * inverse[None, :]) @ eigvecs.T


def cp_epc(tensor: np.ndarray, rank: int, init: str = "svd", n_iter_max: int = 100, tol: float = 1e-8,
           random_state: int = 0, epc_iter_max: int = 100, epc_tol: float = 1e-6) -> CPFactors:
    """(lambda, unit-column factors) of `tensor` at `rank` by ALS then error-preserving correction.

    n_iter_max/tol/init/random_state drive the initial ALS; epc_iter_max sweeps at most, and
    stop when ||lambda||^2 changes by less than epc_tol relatively.
    """
    if epc_iter_max < 1 or not epc_tol > 0:
        raise PipelineError(f"cp epc: epc_iter_max must be >= 1 and epc_tol > 0, got {epc_iter_max}, {epc_tol}")
    tensor = np.asarray(tensor, dtype=np.float64)
    weights, factors = cp_als(tensor, rank, init=init, n_iter_max=n_iter_max, tol=tol, random_state=random_state)
    factors = [f.copy() for f in factors]
    factors[0] = factors[0] * weights[None, :]
    with tl.backend_context("numpy"):
        bound2 = float(np.sum((tensor - tl.cp_to_tensor((None, factors))) ** 2))
    norm2 = float(np.sum(tensor ** 2))
    previous = None
    carrier = 0  # the one factor whose columns are not unit: it holds the scale (lambda)
    cache = PartialCache()
    for _ in range(epc_iter_max):
        for n in range(tensor.ndim):
            if carrier != n:  # move the scale into factor n; every other factor is unit already
                norms = np.linalg.norm(factors[carrier], axis=0)
                norms[norms == 0] = 1.0
                factors[carrier] = factors[carrier] / norms[None, :]
                factors[n] = factors[n] * norms[None, :]
            factors[n] = _constrained_least_norm(norm2, hadamard_gram(factors, skip=n),
                                                 mttkrp(tensor, factors, n, cache), bound2)
            carrier = n
        lambda2 = float(np.sum(factors[-1] ** 2))  # every other factor has unit columns
        if previous is not None and abs(previous - lambda2) <= epc_tol * max(previous, 1e-300):
            break
        previous = lambda2
    norms = np.linalg.norm(factors[-1], axis=0)
    factors[-1] = np.divide(factors[-1], norms[None, :], out=np.zeros_like(factors[-1]), where=norms[None, :] > 0)
    return norms, factors
