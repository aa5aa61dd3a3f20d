"""Factorizations that minimise the error on the data, not on the weights (Kalle, Rudkiewicz et al. 2025).

The objective of a layer with unfolded weight W (T x S*k^2) is E||(W - W~) x||^2 over its
input patches x, i.e. tr((W - W~) Sigma (W - W~)^T) with the uncentred second moment
Sigma = E[x x^T] (passes/layer_data.py). With the uncentred moment the bias needs no
correction: the mean is part of the objective. Each method takes one group's kernel and
Sigma block and returns factors in the layout of its weight-only twin (svd.py, tucker2.py,
cp.py), so the same `_realise` builds the layers.

- SVD-Sigma: closed form W~ = U_r U_r^T W, U_r the top eigenvectors of W Sigma W^T (PCA of
  the layer's outputs).
- Tucker-2-Sigma: ALS from the weight-only HOOI result. U_T and the core in closed form
  given U_S; U_S by a matrix-free conjugate-gradient solve of its normal equations (scipy);
  an iterate that raises the error is reverted, so the result is never worse than its start.
- CP-Sigma: ALS from the weight-only CP result; the output factor in closed form, the others
  by conjugate gradients; the same revert rule.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.linalg
import tensorly as tl
from scipy.sparse.linalg import LinearOperator, cg

from ._common import gram_svd

CG_ITERATIONS = 30  # per factor update; CG starts from the current factor, so each update only improves it
EXACT_UNKNOWNS = 8192  # a CP factor with at most this many entries is solved exactly (a spatial one: 9 x R)
SWEEP_TOL = 1e-3    # stop when a sweep lowers the Sigma-error by less than this fraction (measured: the first
                    # closed-form step gives nearly all of the gain, later sweeps ~0.1-1 % each)


def sigma_error(weight: np.ndarray, approx: np.ndarray, sigma: np.ndarray) -> float:
    """Relative Sigma-weighted error sqrt(tr(D Sigma D^T) / tr(W Sigma W^T)), D = W - W~ (unfolded)."""
    weight = weight.reshape(weight.shape[0], -1)
    diff = weight - approx.reshape(weight.shape)
    # (W Sigma) * W summed: one GEMM (a three-operand einsum without a path loops in C, 10x slower)
    den = float(np.sum((weight @ sigma) * weight))
    num = float(np.sum((diff @ sigma) * diff))
    return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else float(np.sqrt(max(num, 0.0)))


def sigma_spectrum(weight: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Eigenvalues of W Sigma W^T, descending: the output energy each SVD-Sigma rank keeps."""
    weight = weight.reshape(weight.shape[0], -1)
    values = np.linalg.eigvalsh(weight @ sigma @ weight.T)[::-1]
    return np.clip(values, 0.0, None)


# ---- SVD ----------------------------------------------------------------------------------------

def svd_sigma_factors(weight: np.ndarray, rank: int, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(W1, W2) with W2 @ W1 = U_r U_r^T W: W1 = U_r^T W (rank x in), W2 = U_r (out x rank)."""
    weight = np.asarray(weight, np.float64).reshape(weight.shape[0], -1)
    _, vectors = np.linalg.eigh(weight @ sigma @ weight.T)
    basis = vectors[:, ::-1][:, :rank]
    return basis.T @ weight, basis


# ---- Tucker-2 -----------------------------------------------------------------------------------

def _tucker_closed_form(kernel: np.ndarray, sigma: np.ndarray, u_in: np.ndarray,
                        rank_out: int) -> tuple[np.ndarray, np.ndarray]:
    """(U_T, G) minimising the Sigma-error for a fixed orthonormal U_S.

    With P = U_S (x) I_k2: Sigma_z = P^T Sigma P, M0 = K Sigma P Sigma_z^-1, U_T = top left
    singular vectors of M0 C (Sigma_z = C C^T), G = U_T^T M0 (shape R_T x R_S*k2).
    """
    out, s, taps = kernel.shape[0], kernel.shape[1], int(np.prod(kernel.shape[2:]))
    sig4 = sigma.reshape(s, taps, s, taps)
    proj = np.einsum("sr,sjtb,tc->rjcb", u_in, sig4, u_in, optimize=True).reshape(u_in.shape[1] * taps, -1)
    proj = 0.5 * (proj + proj.T)
    k_sigma = kernel.reshape(out, -1) @ sigma                                   # T x S k2
    k_sigma_p = np.einsum("tsj,sr->trj", k_sigma.reshape(out, s, taps), u_in).reshape(out, -1)
    chol = np.linalg.cholesky(proj + 1e-12 * np.trace(proj) / len(proj) * np.eye(len(proj)))
    m0 = np.linalg.solve(chol.T, np.linalg.solve(chol, k_sigma_p.T)).T        # K Sigma P Sigma_z^-1
    u_out = _complete(gram_svd(m0 @ chol, rank_out)[0], rank_out)  # the leading left vectors (eigh of the Gram)
    return u_out, u_out.T @ m0


def _complete(basis: np.ndarray, columns: int) -> np.ndarray:
    """`basis` with orthonormal columns added up to `columns`.

    M0 has only R_S*k2 columns, so when R_T exceeds that (a 1x1 conv with R_T > R_S) its SVD gives
    fewer vectors than the core needs; the added directions get zero core rows, as in HOOI.
    """
    missing = columns - basis.shape[1]
    if missing <= 0:
        return basis
    probe = np.random.default_rng(0).standard_normal((basis.shape[0], missing))
    probe -= basis @ (basis.T @ probe)
    return np.concatenate([basis, np.linalg.qr(probe)[0]], axis=1)


def _tucker_kernel(core: np.ndarray, u_out: np.ndarray, u_in: np.ndarray) -> np.ndarray:
    return np.einsum("trj,ot,sr->osj", core, u_out, u_in, optimize=True)


def _solve_u_in(kernel: np.ndarray, sigma: np.ndarray, core: np.ndarray, u_out: np.ndarray,
                u_in: np.ndarray) -> np.ndarray:
    """U_S minimising ||(U_T^T K - B(U_S)) L||^2, B(U)[t,s,j] = sum_r G[t,r,j] U[s,r]: CG on the normal equations."""
    s, rank_in = u_in.shape
    taps = core.shape[2]
    target = (u_out.T @ kernel.reshape(kernel.shape[0], -1)) @ sigma            # A Sigma, R_T x S k2

    def adjoint(c: np.ndarray) -> np.ndarray:                                   # (R_T, S k2) -> (S, R_S)
        return np.einsum("trj,tsj->sr", core, c.reshape(-1, s, taps), optimize=True)

    def normal(vector: np.ndarray) -> np.ndarray:
        forward = np.einsum("trj,sr->tsj", core, vector.reshape(s, rank_in), optimize=True).reshape(len(core), -1)
        return adjoint(forward @ sigma).ravel()

    operator = LinearOperator((s * rank_in, s * rank_in), matvec=normal, dtype=np.float64)
    solution, _ = cg(operator, adjoint(target).ravel(), x0=u_in.ravel(), maxiter=CG_ITERATIONS, rtol=1e-10)
    return solution.reshape(s, rank_in)


def tucker2_sigma_factors(kernel: np.ndarray, ranks: tuple[int, int], sigma: np.ndarray,
                          start: tuple[np.ndarray, np.ndarray, np.ndarray], n_iter_max: int = 3,
                          history: list[float] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(core, U_T, U_S) of one group, from the weight-only `start` (core, U_T, U_S); core (R_T, R_S, *k).

    `history` receives the Sigma-error of the start and of every accepted iterate (non-increasing).
    """
    kernel = np.asarray(kernel, np.float64)
    out, s, spatial = kernel.shape[0], kernel.shape[1], kernel.shape[2:]
    taps = int(np.prod(spatial))
    core, u_out, u_in = (np.asarray(a, np.float64) for a in start)
    core = core.reshape(ranks[0], ranks[1], taps)
    flat = kernel.reshape(out, s, taps)

    def error(c: np.ndarray, uo: np.ndarray, ui: np.ndarray) -> float:
        return sigma_error(flat, _tucker_kernel(c, uo, ui), sigma)

    best = error(core, u_out, u_in)
    log = history if history is not None else []
    log.append(best)
    for sweep in range(n_iter_max + 1):
        if sweep:  # the U_S step: CG from the current U_S, then orthonormalise (only its span matters)
            u_in_new = np.linalg.qr(_solve_u_in(flat, sigma, core, u_out, u_in))[0]
        else:      # first the closed form for the weight-only U_S
            u_in_new = u_in
        u_out_new, g = _tucker_closed_form(flat, sigma, u_in_new, ranks[0])
        core_new = g.reshape(ranks[0], ranks[1], taps)
        value = error(core_new, u_out_new, u_in_new)
        if value > best * (1 + 1e-9):
            break  # revert: keep the previous iterate
        improved = best - value
        core, u_out, u_in, best = core_new, u_out_new, u_in_new, value
        log.append(best)
        if sweep and improved <= SWEEP_TOL * max(best, 1e-12):
            break
    return core.reshape(ranks[0], ranks[1], *spatial), u_out, u_in


# ---- CP -----------------------------------------------------------------------------------------
# Every operator is a GEMM against the Khatri-Rao product of the input-side factors: numpy's einsum
# over the rank index runs in C without BLAS and took 90 % of the time (25 min per 512x512x3x3 layer).

def _khatri_rao(factors: Sequence[np.ndarray]) -> np.ndarray:
    """Rows (i1, i2, ...) in C order, column r = product of the factors' r-th columns (prod(d) x R)."""
    return factors[0] if len(factors) == 1 else tl.tenalg.khatri_rao(list(factors))


def _cp_kernel(factors: Sequence[np.ndarray]) -> np.ndarray:
    """sum_r a_r (x) b_r (x) ... of the factors (the first holds the weights), unfolded to (T, rest)."""
    return factors[0] @ _khatri_rao(factors[1:]).T


def _contract_others(unfolded: np.ndarray, factors: list[np.ndarray], mode: int) -> np.ndarray:
    """(d_mode, R): `unfolded` (prod(d) x R, rows over the input-side modes) times every factor but `mode`'s."""
    dims = [f.shape[0] for f in factors[1:]]
    rank = factors[0].shape[1]
    block = unfolded.reshape(*dims, rank)
    for axis in reversed(range(len(dims))):      # from the last axis, so the earlier axes keep their place
        if axis + 1 != mode:
            shape = [1] * block.ndim
            shape[axis], shape[-1] = dims[axis], rank
            block = (block * factors[axis + 1].reshape(shape)).sum(axis=axis)
    return block


def _normal_rhs(mode: int, factors: list[np.ndarray], flat_sigma: np.ndarray) -> np.ndarray:
    """Right-hand side of factor `mode`'s normal equations, contract((K Sigma)^T A), raveled (d_mode * R)."""
    return _contract_others(flat_sigma.T @ factors[0], factors, mode).ravel()


def _solve_factor(mode: int, factors: list[np.ndarray], flat_sigma: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Factor `mode` (>= 1) minimising the Sigma-error with the others fixed: CG on the normal equations.

    With Z the Khatri-Rao of the input-side factors and G = A^T A, the normal operator is
    X -> contract(Sigma Z(X) G) and the right-hand side contract((K Sigma)^T A).
    """
    dim, rank = factors[mode].shape
    gram = factors[0].T @ factors[0]
    sigma32 = sigma.astype(np.float32)  # the GEMM with Sigma in float32: twice as fast, and CG's steps need
                                        # no more than its ~1e-6 relative accuracy (the Sigma-error is float64)

    def normal(vector: np.ndarray) -> np.ndarray:
        parts = list(factors)
        parts[mode] = vector.reshape(dim, rank)
        product = (sigma32 @ _khatri_rao(parts[1:]).astype(np.float32)).astype(np.float64)
        return _contract_others(product @ gram, parts, mode).ravel()

    rhs = _normal_rhs(mode, factors, flat_sigma)
    operator = LinearOperator((dim * rank,) * 2, matvec=normal, dtype=np.float64)
    solution, _ = cg(operator, rhs, x0=factors[mode].ravel(), maxiter=CG_ITERATIONS, rtol=1e-10)
    return solution.reshape(dim, rank)


def _solve_factor_exact(mode: int, factors: list[np.ndarray], flat_sigma: np.ndarray,
                        sigma: np.ndarray) -> np.ndarray:
    """Factor `mode` from its normal equations built explicitly: for the small (spatial) modes.

    H[(i, r), (i', r')] = G[r, r'] * z_r^T Sigma[rows i, rows i'] z_r', where rows i are the unfolded
    rows whose mode index is i and z the Khatri-Rao of the other input-side factors.
    """
    dim, rank = factors[mode].shape
    dims = [f.shape[0] for f in factors[1:]]
    index = np.arange(int(np.prod(dims))).reshape(dims)
    rows = [np.take(index, i, axis=mode - 1).ravel() for i in range(dim)]
    others = _khatri_rao([f for k, f in enumerate(factors[1:], start=1) if k != mode])
    sigma_z = np.concatenate([sigma[:, r] @ others for r in rows], axis=1)    # S k2 x (dim R), columns (i, r)
    normal = np.concatenate([others.T @ sigma_z[r] for r in rows], axis=0)   # (dim R) x (dim R)
    normal *= np.tile(factors[0].T @ factors[0], (dim, dim))
    rhs = _normal_rhs(mode, factors, flat_sigma)
    try:
        solution = scipy.linalg.solve(normal, rhs, assume_a="pos")
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):   # singular: a rank-deficient start
        solution = np.linalg.lstsq(normal, rhs, rcond=None)[0]
    return solution.reshape(dim, rank)


def _solve_output(factors: list[np.ndarray], flat: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Closed form of the output factor: A = K Sigma Z (Z^T Sigma Z)^+, Z the Khatri-Rao of the others."""
    z = _khatri_rao(factors[1:])                                                # S k2 x R
    sigma_times_z = sigma @ z
    return np.linalg.lstsq(z.T @ sigma_times_z, (flat @ sigma_times_z).T, rcond=None)[0].T


def cp_sigma_factors(tensor: np.ndarray, sigma: np.ndarray, start: tuple[np.ndarray, list[np.ndarray]],
                     n_iter_max: int = 10, history: list[float] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """(weights, factors) of one group's CP tensor (T, S, k2) or (T, S, kh, kw), from the weight-only `start`.

    First the output factor in closed form for the start's input-side factors (it gives most of the
    gain, at the cost of one GEMM with Sigma), then sweeps of CG updates of the other factors.
    """
    tensor = np.asarray(tensor, np.float64)
    weights, start_factors = start
    factors = [np.asarray(f, np.float64) for f in start_factors]
    factors[0] = factors[0] * np.asarray(weights, np.float64)[None, :]
    flat = tensor.reshape(tensor.shape[0], -1)
    flat_sigma = flat @ sigma

    def error(parts: list[np.ndarray]) -> float:
        return sigma_error(flat, _cp_kernel(parts), sigma)

    best = error(factors)
    log = history if history is not None else []
    log.append(best)
    for sweep in range(n_iter_max + 1):
        trial = list(factors)
        if sweep:
            for mode in range(1, len(trial)):
                exact = trial[mode].size <= EXACT_UNKNOWNS
                trial[mode] = (_solve_factor_exact if exact else _solve_factor)(mode, trial, flat_sigma, sigma)
        trial[0] = _solve_output(trial, flat, sigma)
        value = error(trial)
        if value > best * (1 + 1e-9):
            break
        improved = best - value
        factors, best = _balanced(trial), value
        log.append(best)
        if sweep and improved <= SWEEP_TOL * max(best, 1e-12):
            break
    return np.ones(factors[0].shape[1]), factors


def _balanced(factors: list[np.ndarray]) -> list[np.ndarray]:
    """Columns of equal norm across modes (same product), so float32 storage stays well scaled."""
    norms = [np.linalg.norm(f, axis=0) for f in factors]
    total = np.prod(norms, axis=0)
    safe = [np.where(n > 0, n, 1.0) for n in norms]
    root = np.where(total > 0, total, 0.0) ** (1.0 / len(factors))
    return [f / s[None, :] * root[None, :] for f, s in zip(factors, safe)]


