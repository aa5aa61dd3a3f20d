"""Tensor-Train matrix factorisation of a Linear layer (Novikov et al. 2015; docs/methods.md#tt).

out = prod(m_k), in = prod(n_k); W[(i), (j)] = G_1[i_1, j_1] ... G_d[i_d, j_d] with cores
G_k: (r_{k-1}, m_k, n_k, r_k), r_0 = r_d = 1, computed by TT-SVD (tensorly's
`tensor_train_matrix` on W.reshape(*out_modes, *in_modes)). Row and column indices are read
in C order, which is what `ir.torch_modules.TTLinearModule` contracts.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import tensorly as tl
from tensorly.decomposition import tensor_train_matrix

from tensorfold.ir.errors import PipelineError
from tensorfold.ir.specs import Linear, Spec, TTLinear

from ._common import NotFactorable, as_bias, as_weight

DEFAULT_MAX_MODES = 3


def _prime_factor_count(n: int) -> int:
    count, p = 0, 2
    while p * p <= n:
        while n % p == 0:
            n, count = n // p, count + 1
        p += 1
    return count + (n > 1)


def _splits(n: int, parts: int, smallest: int = 1) -> Iterator[tuple[int, ...]]:
    """Non-decreasing tuples of `parts` integers >= smallest whose product is n."""
    if parts == 1:
        if n >= smallest:
            yield (n,)
        return
    for first in range(smallest, int(round(n ** (1 / parts))) + 1):
        if n % first == 0:
            for rest in _splits(n // first, parts - 1, first):
                yield (first, *rest)


def factorize_size(n: int, d: int) -> tuple[int, ...]:
    """The most balanced d factors of n (smallest largest factor), ascending; 1s if n has < d primes."""
    if n < 1 or d < 1:
        raise PipelineError(f"tt: cannot split size {n} into {d} modes")
    return min(_splits(n, d), key=lambda split: (split[-1], -split[0]))


def tt_modes(in_features: int, out_features: int, d: int | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(in_modes, out_modes), balanced; d = min(3, most prime factors of either size) unless given.

    Output modes are paired in reverse (largest with the smallest input mode) so that the
    core sizes m_k * n_k, and with them the parameters, stay even.
    """
    if d is None:
        d = min(DEFAULT_MAX_MODES, max(_prime_factor_count(in_features), _prime_factor_count(out_features)))
        if d < 2:
            raise NotFactorable(f"tt: sizes {in_features} and {out_features} are prime, nothing to factor")
    in_modes = factorize_size(in_features, d)
    out_modes = tuple(reversed(factorize_size(out_features, d)))
    return in_modes, out_modes


def tt_max_ranks(in_modes: Sequence[int], out_modes: Sequence[int]) -> tuple[int, ...]:
    """Bound of every inner bond k: min(prod_{j<=k} m_j n_j, prod_{j>k} m_j n_j)."""
    sizes = [m * n for m, n in zip(out_modes, in_modes)]
    return tuple(min(math.prod(sizes[:k + 1]), math.prod(sizes[k + 1:])) for k in range(len(sizes) - 1))


def tt_params(in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]) -> int:
    """sum_k r_{k-1} m_k n_k r_k for inner ranks `ranks` (bias excluded)."""
    bonds = (1, *ranks, 1)
    return sum(bonds[k] * m * n * bonds[k + 1] for k, (m, n) in enumerate(zip(out_modes, in_modes)))


def tt_ranks(ranks: int | Sequence[int], in_modes: Sequence[int], out_modes: Sequence[int]) -> tuple[int, ...]:
    """Inner ranks from an int (a cap applied to every bond) or from d-1 (or d+1 with end 1s) ints."""
    bounds = tt_max_ranks(in_modes, out_modes)
    if isinstance(ranks, (int, np.integer)) and not isinstance(ranks, bool):
        if ranks < 1:
            raise PipelineError(f"tt: rank must be >= 1, got {ranks}")
        return tuple(min(int(ranks), bound) for bound in bounds)
    ranks = tuple(ranks)
    if len(ranks) == len(bounds) + 2 and ranks[0] == ranks[-1] == 1:
        ranks = ranks[1:-1]
    if len(ranks) != len(bounds) or not all(1 <= r <= b for r, b in zip(ranks, bounds)):
        raise PipelineError(f"tt: ranks {ranks} must be {len(bounds)} inner ranks within {bounds}")
    return tuple(int(r) for r in ranks)


def check_tt(spec: Spec) -> str | None:
    """Why `spec` cannot be TT factored, or None if it can."""
    if not isinstance(spec, Linear):
        return f"tt factors Linear layers, not {type(spec).__name__}"
    try:
        tt_modes(spec.in_features, spec.out_features)
    except NotFactorable as e:
        return e.reason
    return None


def _resolve(linear: Linear, in_modes: Sequence[int] | None, out_modes: Sequence[int] | None,
             d: int | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if not isinstance(linear, Linear):
        raise NotFactorable(check_tt(linear) or "tt factors Linear layers")
    auto_in, auto_out = tt_modes(linear.in_features, linear.out_features,
                                 d or (len(in_modes) if in_modes else len(out_modes) if out_modes else None))
    in_modes, out_modes = tuple(in_modes or auto_in), tuple(out_modes or auto_out)
    if (math.prod(in_modes), math.prod(out_modes)) != (linear.in_features, linear.out_features) \
            or len(in_modes) != len(out_modes):
        raise PipelineError(f"tt: modes {in_modes} x {out_modes} do not factor a "
                            f"{linear.in_features} -> {linear.out_features} Linear into equally many modes")
    return in_modes, out_modes


def unfolding_matrices(linear: Linear, in_modes: Sequence[int], out_modes: Sequence[int]) -> list[np.ndarray]:
    """The bond-k unfoldings of the TT-matrix tensor; bond k's TT rank is the rank of matrix k."""
    d = len(in_modes)
    tensor = np.asarray(linear.weight, dtype=np.float64).reshape(*out_modes, *in_modes)
    interleaved = tensor.transpose([i for k in range(d) for i in (k, d + k)])
    sizes = [m * n for m, n in zip(out_modes, in_modes)]
    return [interleaved.reshape(math.prod(sizes[:k + 1]), -1) for k in range(d - 1)]


def tt_spec(linear: Linear, ranks: int | Sequence[int], in_modes: Sequence[int] | None = None,
            out_modes: Sequence[int] | None = None, d: int | None = None) -> TTLinear:
    """The TTLinear spec of `linear` by TT-SVD at `ranks`, cores in float32, bias kept."""
    in_modes, out_modes = _resolve(linear, in_modes, out_modes, d)
    inner = tt_ranks(ranks, in_modes, out_modes)
    tensor = np.asarray(linear.weight, dtype=np.float64).reshape(*out_modes, *in_modes)
    with tl.backend_context("numpy"):
        cores = tensor_train_matrix(tensor, rank=[1, *inner, 1]).factors
    return TTLinear([as_weight(core) for core in cores], in_modes, out_modes, as_bias(linear.bias))


def tt_layout(linear: Linear, ranks: int | Sequence[int], in_modes: Sequence[int] | None = None,
              out_modes: Sequence[int] | None = None, d: int | None = None) -> TTLinear:
    """A zero-core TTLinear with the shapes `tt_spec` would emit."""
    in_modes, out_modes = _resolve(linear, in_modes, out_modes, d)
    bonds = (1, *tt_ranks(ranks, in_modes, out_modes), 1)
    cores = [np.zeros((bonds[k], m, n, bonds[k + 1]), dtype=np.float32)
             for k, (m, n) in enumerate(zip(out_modes, in_modes))]
    return TTLinear(cores, in_modes, out_modes, as_bias(linear.bias))
