"""Unified low-rank + sparse approximation of a layer on its data (Ma et al., ICTAI 2019).

Math: docs/methods.md#lowrank_sparse.

W (T x D, D = S*g: a conv's unfolded kernel, g = k^2 taps per input channel; a Linear's weight, g = 1)
is approximated by A + B: A keeps whole column groups (input channels) and B has rank L, so that
g(X (A+B)^T + b) matches Y = g(X W^T + b) on the layer's calibration patches X, g = ReLU where
one follows the layer, the identity otherwise. ADMM with M = A + B:

    A <- column-group shrinkage of M - B - Lambda/t     (group lasso, lambda1 ||A||_{2,1})
    B <- singular value thresholding of M - A - Lambda/t (lambda2 ||B||_*)
    M <- argmin f(M) + t/2 ||M - (A + B + Lambda/t)||^2  (closed form when g is linear; else
         majorize-minimize steps preconditioned by the linear curvature 2 Sigma / |Y|^2)
    Lambda <- Lambda + t (A + B - M)

then the targets are enforced exactly (the channels of A with the largest group norms are kept,
B is truncated to rank L) and, optionally, the kept parameters are refitted on the data: the
Sigma-weighted least-squares alternation of A and B against W, then (ReLU) majorize-minimize
steps on the post-activation error over A's kept columns, both factors of B and the bias. With
the refit, the channels of the ADMM's start (the weight-space split) are refitted too and win
where they fit the data better (on the digits CNN's conv2 they did: 0.101 against 0.110 held out).

The thresholds lambda/t are set each iteration where the prox meets the targets (the (S_kept+1)-th
largest group norm, the (L+1)-th singular value of its argument), times the relative lambda1, lambda2:
with fixed lambdas the split drifts wherever their ratio leads (measured on the digits CNN: B absorbed
all of A), and the targets are what the user asked for. Everything works on W / ||W||_F in float64,
with the loss divided by mean |y|^2, so lambdas and the penalty are scale-free.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tensorfold.ir.errors import PipelineError

REFIT_ROUNDS = 10   # Sigma-weighted A/B alternations (each lowers the linear error; 10 settle it on trained convs)
RELU_REFIT_STEPS = 20


@dataclass
class LowRankSparse:
    """A + B = sparse + second @ first, in the layer's own units."""

    sparse: np.ndarray          # A (T, D), zero outside the kept channels' columns
    kept: np.ndarray            # kept input channels of A, ascending
    first: np.ndarray           # (L, D): B's right factor (the kxk conv S -> L)
    second: np.ndarray          # (T, L): B's left factor (the 1x1 conv L -> T)
    bias: np.ndarray | None
    residual: float             # ADMM primal residual ||A + B - M||_F / ||W||_F at the end
    lambdas: tuple[float, float]  # lambda1, lambda2 of the last iteration (W / ||W||_F, loss / mean |y|^2)
    penalty: float              # t as used (same units)
    channels_from: str = "admm"  # whose channels A keeps: "admm", or "weight-space split" where those fit better

    @property
    def dense(self) -> np.ndarray:
        return self.sparse + self.second @ self.first


@dataclass
class FitData:
    """A layer's calibration data as the fit needs it: Sigma over all fit rows, and a row sample."""

    sigma: np.ndarray   # (D, D) E[x x^T] over every fit patch row
    rows: np.ndarray    # (N, D) patch rows sampled from the fit data (for the post-activation loss)


def group_norms(matrix: np.ndarray, group: int) -> np.ndarray:
    """Frobenius norm of every column group (input channel): (S,)."""
    t, d = matrix.shape
    return np.sqrt(np.sum(matrix.reshape(t, d // group, group) ** 2, axis=(0, 2)))


def group_shrink(matrix: np.ndarray, group: int, threshold: float) -> np.ndarray:
    """Prox of threshold * ||.||_{2,1} over column groups: each group scaled by (1 - threshold/||group||)_+."""
    norms = group_norms(matrix, group)
    factor = np.clip(1.0 - threshold / np.maximum(norms, 1e-300), 0.0, None)
    return matrix * np.repeat(factor, group)[None, :]


def singular_shrink(matrix: np.ndarray, threshold: float) -> np.ndarray:
    """Prox of threshold * ||.||_*: singular values sigma <- (sigma - threshold)_+."""
    left, values, right_t = np.linalg.svd(matrix, full_matrices=False)
    return (left * np.clip(values - threshold, 0.0, None)) @ right_t


def keep_groups(matrix: np.ndarray, group: int, count: int) -> np.ndarray:
    """Indices (ascending) of the `count` column groups with the largest norms."""
    norms = group_norms(matrix, group)
    return np.sort(np.argsort(-norms, kind="stable")[:count])


def columns_of(channels: np.ndarray, group: int) -> np.ndarray:
    return (np.asarray(channels)[:, None] * group + np.arange(group)[None, :]).reshape(-1)


def truncate(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(first (rank, D), second (T, rank)) of the best rank-`rank` approximation, balanced split."""
    left, values, right_t = np.linalg.svd(matrix, full_matrices=False)
    root = np.sqrt(values[:rank])
    return root[:, None] * right_t[:rank], left[:, :rank] * root[None, :]


class _Metric:
    """Sigma = U diag(e) U^T (damped, so invertible): weighted SVDs and the M update's solve."""

    def __init__(self, sigma: np.ndarray, damping: float):
        sigma = (sigma + sigma.T) / 2
        sigma = sigma + damping * max(float(np.trace(sigma)) / len(sigma), 1e-30) * np.eye(len(sigma))
        self.sigma = sigma
        values, self.basis = np.linalg.eigh(sigma)
        self.values = np.clip(values, values.max() * 1e-12, None)
        self.root = (self.basis * np.sqrt(self.values)) @ self.basis.T
        self.inverse_root = (self.basis / np.sqrt(self.values)) @ self.basis.T

    def solve(self, rhs: np.ndarray, scale: float, shift: float) -> np.ndarray:
        """rhs @ (scale * Sigma + shift * I)^-1."""
        return ((rhs @ self.basis) / (scale * self.values + shift)) @ self.basis.T

    def low_rank(self, matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """argmin over rank-`rank` B of ||(matrix - B) Sigma^1/2||: [matrix Sigma^1/2]_rank Sigma^-1/2, factored."""
        if rank == 0:
            return np.zeros((0, matrix.shape[1])), np.zeros((matrix.shape[0], 0))
        first, second = truncate(matrix @ self.root, rank)
        return first @ self.inverse_root, second


class _Loss:
    """f = mean_rows ||y - g(z)||^2 / mean_rows ||y||^2 on the sampled rows, z the pre-activation."""

    def __init__(self, rows: np.ndarray, weight: np.ndarray, bias: np.ndarray, relu: bool):
        self.x = np.asarray(rows, np.float64)
        self.bias = bias
        self.relu = relu
        self.y = self._act(self.x @ weight.T + bias)
        self.norm = max(float(np.mean(np.sum(self.y ** 2, 1))), 1e-30)

    def _act(self, z: np.ndarray) -> np.ndarray:
        return np.maximum(z, 0) if self.relu else z

    def value_dz(self, z: np.ndarray) -> tuple[float, np.ndarray]:
        """The loss at pre-activation z, and its gradient in z."""
        residual = self._act(z) - self.y
        value = float(np.mean(np.sum(residual ** 2, 1))) / self.norm
        if self.relu:
            residual = residual * (z > 0)
        return value, (2.0 / (len(z) * self.norm)) * residual

    def value_grad(self, dense: np.ndarray) -> tuple[float, np.ndarray]:
        """Loss and gradient in M of g(x M^T + b)."""
        value, dz = self.value_dz(self.x @ dense.T + self.bias)
        return value, dz.T @ self.x


def lowrank_sparse(weight: np.ndarray, bias: np.ndarray | None, group: int, data: FitData, *, keep: int, rank: int,
                   relu: bool, lambda1: float = 1.0, lambda2: float = 1.0, penalty: float = 10.0, iters: int = 30,
                   steps: int = 3, refit: bool = True, damping: float = 1e-3) -> LowRankSparse:
    """A (`keep` of the S = D/group input channels) + B (rank `rank`) for W on `data` (module docstring).

    lambda1, lambda2 scale the per-iteration thresholds (1: the prox removes exactly the channels and
    singular values beyond the targets; < 1 shrinks less). penalty scales t against the loss's mean
    curvature 2 mean(eig Sigma) / mean |y|^2. The ADMM starts from the weight-space split of W
    (alternating projections), with M = W and Lambda = 0.
    """
    weight = np.asarray(weight, np.float64)
    t_out, width = weight.shape
    if width % group:
        raise PipelineError(f"lowrank_sparse: weight width {width} is not a multiple of the group size {group}")
    channels = width // group
    keep, rank = int(keep), int(rank)
    if not 0 <= keep <= channels or not 0 <= rank <= min(t_out, width):
        raise PipelineError(f"lowrank_sparse: keep={keep} must lie in [0, {channels}] and rank={rank} in "
                            f"[0, {min(t_out, width)}]")
    scale = max(float(np.linalg.norm(weight)), 1e-30)
    w = weight / scale
    b = np.zeros(t_out) if bias is None else np.asarray(bias, np.float64) / scale
    metric = _Metric(data.sigma, damping)
    loss = _Loss(data.rows, w, b, relu)
    # the loss's mean curvature: f(W + D) ~ curvature/2 ||D||^2 for a D of no preferred direction
    curvature = 2.0 * float(np.mean(metric.values)) / loss.norm
    t = penalty * curvature

    start_sparse, first, second = _split_in_weight_space(w, group, keep, rank)
    sparse, low, residual, used = _admm(w, start_sparse, second @ first, group, keep, rank, loss, metric, t,
                                        (lambda1, lambda2), iters, steps)
    initial_kept = keep_groups(start_sparse, group, keep)
    kept, channels_from = keep_groups(sparse, group, keep), "admm" if iters else "weight-space split"
    first, second = truncate(low, rank) if rank else (np.zeros((0, width)), np.zeros((t_out, 0)))
    sparse = _enforce(sparse, kept, group)
    if refit:
        original_bias = b
        sparse, first, second, b, value = _refit(w, b, loss, metric, kept, group, rank, relu, sparse)
        if not np.array_equal(kept, initial_kept):  # the weight-space split's channels, if they fit better
            other = _refit(w, original_bias, loss, metric, initial_kept, group, rank, relu,
                           _enforce(start_sparse, initial_kept, group))
            if other[-1] < value:
                (sparse, first, second, b, value), kept, channels_from = other, initial_kept, "weight-space split"
    root = np.sqrt(scale)
    return LowRankSparse(sparse * scale, kept, first * root, second * root,
                         None if bias is None and not (relu and refit) else b * scale,
                         residual, used, t, channels_from)


def _admm(w: np.ndarray, sparse: np.ndarray, low: np.ndarray, group: int, keep: int, rank: int, loss: _Loss,
          metric: _Metric, t: float, lambdas: tuple[float, float], iters: int, steps: int
          ) -> tuple[np.ndarray, np.ndarray, float, tuple[float, float]]:
    """(A, B, ||A + B - M||, the last lambdas) after `iters` ADMM iterations from (A, B), M = W, Lambda = 0."""
    dense, dual = w.copy(), np.zeros_like(w)
    used = (0.0, 0.0)
    for _ in range(iters):
        # thresholds set where the prox meets the targets: the (keep+1)-th group norm, the (L+1)-th singular value
        argument = dense - low - dual / t
        threshold1 = lambdas[0] * _removed_group_norm(argument, group, keep)
        sparse = group_shrink(argument, group, threshold1)
        argument = dense - sparse - dual / t
        values = np.linalg.svd(argument, compute_uv=False)
        threshold2 = lambdas[1] * (float(values[rank]) if rank < len(values) else 0.0)
        low = singular_shrink(argument, threshold2)
        used = (threshold1 * t, threshold2 * t)
        target = sparse + low + dual / t
        if not loss.relu:  # argmin f(M) + t/2 ||M - target||^2 in closed form
            dense = metric.solve(2.0 * (w @ metric.sigma) / loss.norm + t * target, 2.0 / loss.norm, t)
        else:
            for _ in range(steps):
                _, grad = loss.value_grad(dense)
                dense = dense - metric.solve(grad + t * (dense - target), 2.0 / loss.norm, t)
        dual = dual + t * (sparse + low - dense)
    residual = float(np.linalg.norm(sparse + low - dense)) if iters else 0.0
    return sparse, low, residual, used


def _enforce(sparse: np.ndarray, kept: np.ndarray, group: int) -> np.ndarray:
    """A with every column outside the kept channels zeroed."""
    mask = np.zeros(sparse.shape[1], bool)
    mask[columns_of(kept, group)] = True
    return np.where(mask[None, :], sparse, 0.0)


def _refit(w: np.ndarray, b: np.ndarray, loss: _Loss, metric: _Metric, kept: np.ndarray, group: int, rank: int,
           relu: bool, sparse: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """(A, first, second, bias, loss on the fit rows) refitted on the kept channels at `rank`."""
    columns = columns_of(kept, group)
    sparse, first, second = _refit_linear(w, metric, columns, rank, sparse)
    if relu:
        sparse, first, second, b = _refit_relu(loss, metric, columns, sparse, first, second, b)
    z = loss.x @ (sparse + second @ first).T + b
    return sparse, first, second, b, loss.value_dz(z)[0]


def _removed_group_norm(matrix: np.ndarray, group: int, keep: int) -> float:
    """The largest norm among the column groups that keeping `keep` of them removes (0 if none is)."""
    norms = np.sort(group_norms(matrix, group))[::-1]
    return float(norms[keep]) if keep < len(norms) else 0.0


def _split_in_weight_space(w: np.ndarray, group: int, keep: int, rank: int
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Alternating projections W ~ A (keep channels) + B (rank): the ADMM's start and its thresholds."""
    sparse = np.zeros_like(w)
    first, second = np.zeros((0, w.shape[1])), np.zeros((w.shape[0], 0))
    for _ in range(5):
        first, second = truncate(w - sparse, rank) if rank else (first, second)
        residual = w - second @ first
        columns = columns_of(keep_groups(residual, group, keep), group)
        sparse = np.zeros_like(w)
        sparse[:, columns] = residual[:, columns]
    return sparse, first, second


def _refit_linear(w: np.ndarray, metric: _Metric, columns: np.ndarray, rank: int, sparse: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Alternate B = Sigma-weighted rank-L fit of W - A, A_K = least squares of W - B on the kept columns."""
    sigma = metric.sigma
    block = sigma[np.ix_(columns, columns)]
    first, second = metric.low_rank(w - sparse, rank)
    for _ in range(REFIT_ROUNDS if len(columns) else 0):
        rest = w - second @ first
        sparse = np.zeros_like(w)
        sparse[:, columns] = np.linalg.solve(block, (rest @ sigma[:, columns]).T).T
        if not rank:
            break
        first, second = metric.low_rank(w - sparse, rank)
    return sparse, first, second


def _refit_relu(loss: _Loss, metric: _Metric, columns: np.ndarray, sparse: np.ndarray, first: np.ndarray,
                second: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Majorize-minimize steps on the post-activation loss, alternating C = [A_K, second, bias] (the
    pre-activation is linear in C over the features [x_K, first x, 1]; preconditioned by their Gram
    matrix) and `first` (Gauss-Newton: (second^T second)^-1 on the left, Sigma^-1 on the right). A step
    that does not lower the loss is halved, so the loss never rises."""
    x = loss.x
    k, rank = len(columns), second.shape[1]
    coefficients = np.concatenate([sparse[:, columns], second, bias[:, None]], axis=1)

    def features(first: np.ndarray) -> np.ndarray:
        return np.concatenate([x[:, columns], x @ first.T, np.ones((len(x), 1))], axis=1)

    def value_dz(coefficients: np.ndarray, first: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        phi = features(first)
        return (*loss.value_dz(phi @ coefficients.T), phi)

    best, dz, phi = value_dz(coefficients, first)
    steps = [1.0, 1.0]
    for _ in range(RELU_REFIT_STEPS):
        gram = phi.T @ phi / len(x)
        gram += 1e-6 * max(float(np.trace(gram)) / len(gram), 1e-30) * np.eye(len(gram))
        trial = coefficients - steps[0] * np.linalg.solve(2.0 * gram / loss.norm, (dz.T @ phi).T).T
        value, trial_dz, trial_phi = value_dz(trial, first)
        if value < best:
            coefficients, best, dz, phi = trial, value, trial_dz, trial_phi
        else:
            steps[0] /= 2
        if not rank:
            continue
        second = coefficients[:, k:k + rank]
        left = second.T @ second + 1e-9 * max(float(np.trace(second.T @ second)), 1e-30) * np.eye(rank)
        trial_first = first - steps[1] * np.linalg.solve(left, metric.solve(second.T @ dz.T @ x, 2.0 / loss.norm, 0.0))
        value, trial_dz, trial_phi = value_dz(coefficients, trial_first)
        if value < best:
            first, best, dz, phi = trial_first, value, trial_dz, trial_phi
        else:
            steps[1] /= 2
    sparse = np.zeros_like(sparse)
    sparse[:, columns] = coefficients[:, :k]
    return sparse, first, coefficients[:, k:k + rank], coefficients[:, -1]
