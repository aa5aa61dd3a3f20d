"""Recompression of an already factorized layer (MUSCO, Gusak et al. 2019).

A second stage does not start over from the dense kernel: it decomposes only the inner part of
the chain and merges the new outer factors into the existing ones, so the layer keeps its
shape (three convs for Tucker-2, two for SVD) at lower ranks.
- Tucker-2 [U_S, core, U_T]: the core (R_T, R_S, k, k) ~= G x1 V_T x2 V_S; then the first 1x1
  becomes V_S^T U_S (R_S' x S) and the last U_T V_T (T x R_T'). Exact at full rank.
- SVD [A, B] (W = B A): truncated SVD of the product through thin QRs of both factors (an
  r x r SVD, never the T x S matrix); balanced split as in svd.py. Exact at full rank.
- CP [first, depthwise..., last]: the chain's kernel is rebuilt (exact) and decomposed again at
  the lower rank; CP has no core to recompress.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from tensorfold.ir.specs import Conv, Linear, Spec

from ..equivalent import dense_weight
from ._common import NotFactorable, as_bias, as_weight, check_rank
from .cp import cp_specs
from .tucker2 import tucker2_factors


def _ungrouped(chain: Sequence[Spec]) -> None:
    if any(isinstance(s, Conv) and s.groups != 1 and not s.is_depthwise for s in chain):
        raise NotFactorable("grouped factor layers: recompression handles ungrouped chains")


def tucker2_core(chain: Sequence[Spec]) -> Conv:
    """The core conv of a [1x1, core, 1x1] Tucker-2 chain (what the rank policy looks at)."""
    _ungrouped(chain)
    if len(chain) != 3 or not all(isinstance(s, Conv) for s in chain):
        raise NotFactorable("not a Tucker-2 chain (1x1, core, 1x1 convs)")
    first, core, last = chain
    if first.bias is not None and np.any(first.bias) or core.bias is not None and np.any(core.bias):
        raise NotFactorable("a bias inside the Tucker-2 chain")
    return core


def recompress_tucker2(chain: Sequence[Spec], ranks: tuple[int, int], n_iter_max: int = 3,
                       tol: float = 1e-6) -> list[Spec]:
    """[U_S, core, U_T] -> [V_S^T U_S, G, U_T V_T] at core ranks (R_T', R_S')."""
    core = tucker2_core(chain)
    first, _, last = chain
    rank_out = check_rank(ranks[0], core.weight.shape[0], "musco tucker2 R_T")
    rank_in = check_rank(ranks[1], core.weight.shape[1], "musco tucker2 R_S")
    g, v_out, v_in = tucker2_factors(core.weight, (rank_out, rank_in), n_iter_max, tol)
    unit = first.weight.shape[2:]
    u_in = first.weight.reshape(first.weight.shape[0], -1).astype(np.float64)   # (R_S, S)
    u_out = last.weight.reshape(last.weight.shape[0], -1).astype(np.float64)    # (T, R_T)
    new_first = Conv(as_weight((v_in.T @ u_in).reshape(rank_in, -1, *unit)), None, first.stride, first.padding,
                     first.dilation, 1)
    new_core = Conv(as_weight(g), None, core.stride, core.padding, core.dilation, 1)
    new_last = Conv(as_weight((u_out @ v_out).reshape(-1, rank_out, *unit)), as_bias(last.bias), last.stride,
                    last.padding, last.dilation, 1)
    return [new_first, new_core, new_last]


def svd_pair(chain: Sequence[Spec]) -> tuple[np.ndarray, np.ndarray]:
    """(A as rank x (S k^2), B as T x rank) of an SVD chain [A, B]."""
    _ungrouped(chain)
    if len(chain) != 2 or not all(isinstance(s, (Conv, Linear)) for s in chain):
        raise NotFactorable("not an SVD pair")
    first, second = chain
    if first.bias is not None and np.any(first.bias):
        raise NotFactorable("a bias on the first factor")
    a = first.weight.reshape(first.weight.shape[0], -1).astype(np.float64)
    b = second.weight.reshape(second.weight.shape[0], -1).astype(np.float64)
    if b.shape[1] != a.shape[0]:
        raise NotFactorable("the second factor is not a 1x1 over the first's outputs")
    return a, b


def recompress_svd(chain: Sequence[Spec], rank: int) -> list[Spec]:
    """[A, B] -> [A', B'] with B'A' the best rank-`rank` approximation of BA."""
    a, b = svd_pair(chain)
    rank = check_rank(rank, a.shape[0], "musco svd")
    q_b, r_b = np.linalg.qr(b)
    q_a, r_a = np.linalg.qr(a.T)
    u, s, vt = np.linalg.svd(r_b @ r_a.T)
    root = np.sqrt(s[:rank])
    new_b = (q_b @ u[:, :rank]) * root[None, :]
    new_a = root[:, None] * (vt[:rank] @ q_a.T)
    first, second = chain
    if isinstance(first, Linear):
        return [Linear(as_weight(new_a), None), Linear(as_weight(new_b), as_bias(second.bias))]
    unit = second.weight.shape[2:]
    return [Conv(as_weight(new_a.reshape(rank, *first.weight.shape[1:])), None, first.stride, first.padding,
                 first.dilation, 1),
            Conv(as_weight(new_b.reshape(-1, rank, *unit)), as_bias(second.bias), second.stride, second.padding,
                 second.dilation, 1)]


def cp_kernel(chain: Sequence[Spec]) -> Conv:
    """The one conv a CP chain [1x1, depthwise(s), 1x1] computes (the strided, padded spatial factors' settings)."""
    _ungrouped(chain)
    if len(chain) not in (3, 4) or not all(isinstance(s, Conv) for s in chain):
        raise NotFactorable("not a CP chain (1x1, depthwise, 1x1 convs)")
    middle = chain[1:-1]
    if any(d != 1 for m in middle for d in m.dilation):
        raise NotFactorable("a dilated CP chain (its kernel is not the composition of the factors)")
    dims = range(len(middle[0].stride))
    stride = tuple(int(np.prod([m.stride[d] for m in middle])) for d in dims)
    padding = tuple((sum(m.padding[d][0] for m in middle), sum(m.padding[d][1] for m in middle)) for d in dims)
    weight = dense_weight(chain)
    return Conv(as_weight(weight), as_bias(chain[-1].bias), stride, padding, tuple(1 for _ in dims), 1)


def recompress_cp(chain: Sequence[Spec], rank: int, variant: str, **cp_options) -> list[Spec]:
    return cp_specs(cp_kernel(chain), rank, variant, **cp_options)


def cp_rank(chain: Sequence[Spec]) -> int:
    return int(chain[0].weight.shape[0])
