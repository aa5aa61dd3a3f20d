"""Rank policies, kept apart from the decompositions (docs/methods.md#rank-policies, docs/methods.md#pitfalls).

Per layer: `FixedRank` (rank=<int|tuple>), `Ratio` (musco's constant compression rate,
docs/methods.md#ratio), `Energy` (smallest rank keeping a fraction tau of the spectral
energy, docs/methods.md#energy) and
`Evbmf` (docs/methods.md#evbmf, optionally weakened). Across layers: `allocate_budget` spends a params or
FLOPs budget greedily (Zhang et al. 2015, docs/methods.md#budget). Ranks are tuples, one entry per rank of
the method: (r,) for svd / spatial_svd / cp3 / cp4, (R_T, R_S) for tucker2, the inner
bond ranks for tt; ranks of grouped convs are per group.

Automatic ranks are raised to the method's minimum when the layer allows (docs/methods.md#ratio: 2 for CP,
8 for svd and Tucker-2; we also use 8 for spatial_svd, an SVD too, and 2 for tt bonds) and
every rank is clamped to the layer's maximum (docs/methods.md#pitfalls); both are reported in `RankChoice.note`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence, Union

import numpy as np

from tensorfold.ir.errors import PipelineError
from tensorfold.ir.specs import Spec, chain_cost, cost

from .. import decompose as dec
from ..decompose._common import group_kernels
from .evbmf import evbmf, weaken
from .budget import (Allocation, Budget, BudgetError, LayerCandidate, allocate_budget,  # noqa: F401
                     cost_function, layer_candidate, parse_budget)


@dataclass(frozen=True)
class FixedRank:
    ranks: int | tuple[int, ...]


@dataclass(frozen=True)
class Ratio:
    rate: float  # factor params = original weight params / rate


@dataclass(frozen=True)
class Energy:
    tau: float


@dataclass(frozen=True)
class Evbmf:
    weaken: float = 1.0  # 1: the EVBMF rank; w: R - w(R - R_EVBMF) (musco uses 0.8)


RankPolicy = Union[FixedRank, Ratio, Energy, Evbmf]


class RankChoice(NamedTuple):
    ranks: tuple[int, ...]
    note: str | None  # clamping, minimum ranks, EVBMF fallbacks; None when nothing to say


class MethodInfo(NamedTuple):
    """What the policies need to know of one factorization method (the `METHODS` table)."""

    check: Callable[[Spec], str | None]
    max_ranks: Callable[[Spec], tuple[int, ...]]
    params: Callable[[Spec, tuple[int, ...]], int]
    layout: Callable[[Spec, tuple[int, ...]], list[Spec]]
    matrices: Callable[[Spec], list[list[np.ndarray]]] | None  # per rank: one matrix per group
    min_rank: int
    rank_names: Callable[[Spec], tuple[str, ...]]


def _group_matrices(spec: Spec, unfold: Callable[[np.ndarray], np.ndarray]) -> list[np.ndarray]:
    if not hasattr(spec, "groups"):
        return [unfold(np.asarray(spec.weight, dtype=np.float64))]
    return [unfold(k) for k in group_kernels(spec)]


def _unfold_out(kernel: np.ndarray) -> np.ndarray:  # K(1) = T x S k^2 (also a Linear's W)
    return kernel.reshape(kernel.shape[0], -1)


def _unfold_in(kernel: np.ndarray) -> np.ndarray:  # unfold_1 = S x T k^2 (docs/methods.md#evbmf: Tucker-2 needs both)
    return kernel.swapaxes(0, 1).reshape(kernel.shape[1], -1)


def _unfold_spatial(kernel: np.ndarray) -> np.ndarray:  # M = S kh x T kw (docs/methods.md#spatial_svd)
    return kernel.transpose(1, 2, 0, 3).reshape(kernel.shape[1] * kernel.shape[2], -1)


def _tt_modes(spec: Spec) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return dec.tt_modes(spec.in_features, spec.out_features)


def _single(rank_fn: Callable) -> Callable:
    """Adapt a method taking one int rank to the tuple-of-ranks interface."""
    return lambda spec, ranks: rank_fn(spec, ranks[0])


def _cp_info(variant: str) -> MethodInfo:
    return MethodInfo(
        check=lambda s: dec.check_cp(s, variant), max_ranks=lambda s: (dec.cp_max_rank(s, variant),),
        params=lambda s, r: dec.cp_params(s, r[0], variant), layout=lambda s, r: dec.cp_layout(s, r[0], variant),
        matrices=None, min_rank=2, rank_names=lambda s: ("R",))


METHODS: dict[str, MethodInfo] = {
    "svd": MethodInfo(
        check=dec.check_svd, max_ranks=lambda s: (dec.svd_max_rank(s),), params=_single(dec.svd_params),
        layout=_single(dec.svd_layout), matrices=lambda s: [_group_matrices(s, _unfold_out)],
        min_rank=8, rank_names=lambda s: ("r",)),
    "spatial_svd": MethodInfo(
        check=dec.check_spatial_svd, max_ranks=lambda s: (dec.spatial_svd_max_rank(s),),
        params=_single(dec.spatial_svd_params), layout=_single(dec.spatial_svd_layout),
        matrices=lambda s: [_group_matrices(s, _unfold_spatial)], min_rank=8, rank_names=lambda s: ("r",)),
    "tucker2": MethodInfo(
        check=dec.check_tucker2, max_ranks=dec.tucker2_max_ranks, params=dec.tucker2_params,
        layout=dec.tucker2_layout,
        matrices=lambda s: [_group_matrices(s, _unfold_out), _group_matrices(s, _unfold_in)],
        min_rank=8, rank_names=lambda s: ("R_T", "R_S")),
    "cp3": _cp_info("cp3"),
    "cp4": _cp_info("cp4"),
    "tt": MethodInfo(
        check=dec.check_tt, max_ranks=lambda s: dec.tt_max_ranks(*_tt_modes(s)),
        params=lambda s, r: dec.tt_params(*_tt_modes(s), r), layout=lambda s, r: [dec.tt_layout(s, r)],
        matrices=lambda s: [[m] for m in dec.unfolding_matrices(s, *_tt_modes(s))],
        min_rank=2, rank_names=lambda s: tuple(f"r_{k + 1}" for k in range(len(_tt_modes(s)[0]) - 1))),
}


def _method(name: str) -> MethodInfo:
    if name not in METHODS:
        raise PipelineError(f"unknown factorization method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def max_ranks(method: str, spec: Spec) -> tuple[int, ...]:
    """Per-rank upper bounds of `method` on `spec` (R_S <= min(S, T k^2), r <= min(in, out); docs/methods.md#pitfalls)."""
    return tuple(_method(method).max_ranks(spec))


def min_ranks(method: str, spec: Spec) -> tuple[int, ...]:
    """The method's minimum rank (docs/methods.md#ratio), lowered where the layer's maximum is smaller."""
    return tuple(min(_method(method).min_rank, bound) for bound in max_ranks(method, spec))


def factor_params(method: str, spec: Spec, ranks: Sequence[int]) -> int:
    """Weight count of the factor layers at `ranks` (bias excluded)."""
    return _method(method).params(spec, tuple(ranks))


def _matrices(method: str, spec: Spec) -> list[list[np.ndarray]]:
    """Per rank of the method, the matrix (one per group) whose spectrum that rank truncates."""
    matrices = _method(method).matrices
    if matrices is None:
        raise PipelineError(f"{method}: the energy, evbmf and budget policies need a spectrum, which CP "
                            "has not; use rank= or ratio=")
    return matrices(spec)


def rank_spectra(method: str, spec: Spec) -> list[np.ndarray]:
    """Per rank: the energy sigma_i^2 that rank step i keeps, summed over groups, descending."""
    return [np.sum([np.linalg.svd(m, compute_uv=False) ** 2 for m in per_group], axis=0)
            for per_group in _matrices(method, spec)]


def clamp_ranks(method: str, spec: Spec, ranks: Sequence[int]) -> RankChoice:
    """Ranks clamped to the layer's maximum, with a note naming each clamped rank."""
    names, bounds = _method(method).rank_names(spec), max_ranks(method, spec)
    clamped, notes = [], []
    for name, rank, bound in zip(names, ranks, bounds):
        if rank > bound:
            notes.append(f"{method}: {name}={rank} exceeds this layer's maximum {bound}; clamped to {bound}")
        clamped.append(min(int(rank), bound))
    return RankChoice(tuple(clamped), "; ".join(notes) or None)


def _fixed(policy: FixedRank, method: str, spec: Spec) -> tuple[int, ...]:
    count = len(max_ranks(method, spec))
    ranks = (policy.ranks,) * count if isinstance(policy.ranks, (int, np.integer)) else tuple(policy.ranks)
    if len(ranks) != count or any(isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1 for r in ranks):
        raise PipelineError(f"{method}: rank={policy.ranks!r} must be a positive integer or {count} of them")
    return ranks


def _ratio(rate: float, method: str, spec: Spec) -> tuple[int, ...]:
    """musco's constant-rate ranks (docs/methods.md#ratio): params(ranks) <= original weight params / rate."""
    target = np.asarray(spec.weight).size / rate if method != "tt" else spec.in_features * spec.out_features / rate
    if method == "tucker2":
        # R_T = beta R_S, beta = max(0.8 T/S, 1): solve beta k^2 R^2 + (S + beta T) R = P/rate per group
        groups, (per_out, per_in) = spec.groups, (spec.out_channels // spec.groups, spec.weight.shape[1])
        taps, beta = int(np.prod(spec.kernel_size)), max(0.8 * per_out / per_in, 1.0)
        a, b, c = beta * taps, per_in + beta * per_out, -target / groups
        root = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
        return max(int(beta * root), 1), max(int(root), 1)
    if method == "tt":
        # one rank r on every bond (capped by each bond's bound): the largest r within the target
        bounds, rank = max_ranks(method, spec), 1
        while rank < max(bounds) and factor_params(method, spec, [min(rank + 1, b) for b in bounds]) <= target:
            rank += 1
        return tuple(min(rank, b) for b in bounds)
    return (max(int(target / factor_params(method, spec, (1,))), 1),)  # params are linear in r


def _energy(tau: float, method: str, spec: Spec) -> tuple[int, ...]:
    """Per rank, the smallest r whose leading sigma^2 hold a fraction >= tau of the total (docs/methods.md#energy)."""
    ranks = []
    for energies in rank_spectra(method, spec):
        kept = np.cumsum(energies) / max(float(np.sum(energies)), 1e-300)
        ranks.append(min(int(np.searchsorted(kept, tau * (1 - 1e-12))) + 1, len(energies)))
    return tuple(ranks)


def _evbmf(policy: Evbmf, method: str, spec: Spec, notes: list[str]) -> tuple[int, ...]:
    ranks = []
    for name, bound, per_group in zip(_method(method).rank_names(spec), max_ranks(method, spec),
                                      _matrices(method, spec)):
        results = [evbmf(m) for m in per_group]
        found = max(r.rank for r in results)
        if not all(r.reliable for r in results):
            notes.append(f"{method}: EVBMF bounds crossed for {name} (small matrix), estimate unreliable")
        if found == 0:  # musco: an EVBMF rank of 0 means "keep the full rank"
            notes.append(f"{method}: EVBMF found rank 0 for {name}; keeping the full rank {bound}")
            found = bound
        ranks.append(weaken(bound, found, policy.weaken))
    return tuple(ranks)


def select_ranks(policy: RankPolicy, method: str, spec: Spec) -> RankChoice:
    """Ranks of `method` for `spec` under `policy`, clamped to the layer, with a note."""
    reason = _method(method).check(spec)
    if reason is not None:
        raise dec.NotFactorable(reason)
    notes: list[str] = []
    if isinstance(policy, FixedRank):
        ranks = _fixed(policy, method, spec)
    else:
        if isinstance(policy, Ratio):
            if not policy.rate > 0:
                raise PipelineError(f"ratio must be > 0, got {policy.rate}")
            ranks = _ratio(policy.rate, method, spec)
        elif isinstance(policy, Energy):
            if not 0 < policy.tau <= 1:
                raise PipelineError(f"energy must be in (0, 1], got {policy.tau}")
            ranks = _energy(policy.tau, method, spec)
        elif isinstance(policy, Evbmf):
            ranks = _evbmf(policy, method, spec, notes)
        else:
            raise PipelineError(f"unknown rank policy {policy!r}")
        floors = min_ranks(method, spec)
        if any(r < f for r, f in zip(ranks, floors)):
            notes.append(f"{method}: ranks {tuple(ranks)} raised to the minimum {floors}")
            ranks = tuple(max(r, f) for r, f in zip(ranks, floors))
    choice = clamp_ranks(method, spec, ranks)
    notes += [choice.note] if choice.note else []
    return RankChoice(choice.ranks, "; ".join(notes) or None)


def parse_rank_policy(value: object) -> RankPolicy:
    """A policy from an option value: 16, (16, 8), "16", "(16,8)", "rank=16", "ratio=2",
    "energy=0.95", "evbmf", "evbmf(weaken=0.8)"."""
    if isinstance(value, (FixedRank, Ratio, Energy, Evbmf)):
        return value
    if isinstance(value, (int, tuple, list)) and not isinstance(value, bool):
        return FixedRank(value if isinstance(value, int) else tuple(value))
    text = str(value).replace(" ", "")
    try:
        if match := re.fullmatch(r"evbmf(?:\(weaken=([0-9.eE+-]+)\))?", text):
            return Evbmf(float(match.group(1)) if match.group(1) else 1.0)
        key, _, number = text.partition("=")
        if re.fullmatch(r"\(?\d+(,\d+)*\)?", text):  # a bare rank or tuple, as rank= takes
            key, number = "rank", text
        if key == "rank":
            ranks = tuple(int(n) for n in number.strip("()").split(",") if n)
            return FixedRank(ranks[0] if len(ranks) == 1 else ranks)
        if key in ("ratio", "energy"):
            return Ratio(float(number)) if key == "ratio" else Energy(float(number))
    except ValueError as e:
        raise PipelineError(f"bad rank policy {value!r}: {e}") from e
    raise PipelineError(f"unknown rank policy {value!r}; use rank=<int|tuple>, ratio=<x>, energy=<tau> "
                        "or evbmf(weaken=<w>)")


def reduces_cost(original: Spec, factored: Sequence[Spec], in_shape: Sequence[int]) -> bool:
    """True if the factor chain has both fewer params and fewer FLOPs than `original` (docs/methods.md#pitfalls)."""
    before, after = cost(original, in_shape), chain_cost(factored, in_shape)
    return after.params < before.params and after.flops < before.flops


def factorization_pays(method: str, spec: Spec, ranks: Sequence[int], in_shape: Sequence[int]) -> bool:
    """`reduces_cost` at `ranks`, from zero-weight layouts (no decomposition is run)."""
    return reduces_cost(spec, _method(method).layout(spec, tuple(ranks)), in_shape)

