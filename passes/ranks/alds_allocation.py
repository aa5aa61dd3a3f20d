"""ALDS's global allocation: one relative error for all layers, bisected against a budget (docs/methods.md#alds).

For a shared error ε every layer takes, among its (k, j), the cheapest whose error figure is
at most ε, or stays as it is when none costs less than the layer. The model's cost only
changes where ε crosses one of the figures, so bisecting over the sorted figures of all layers
finds the smallest ε that meets the budget exactly (the paper bisects over a real interval).
The paper alternates this with a per-layer choice of k from random seeds; taking the cheapest
(k, j) under ε for every k at once needs no seeds.

The figure is the upper bound of `decompose/alds.py` (`measure="bound"`: ε bounds every layer's
spectral error) or the paper's max_i one (`measure="paper"`: torchprune's allocation, a lower
bound, so the layers' errors exceed ε by up to sqrt(k)).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from tensorfold.ir.specs import Conv, Cost, Linear, chain_cost, cost

from ..decompose import alds as alds_math
from .budget import Budget, BudgetError


@dataclass(frozen=True)
class Choice:
    chunks: int
    rank: int
    error: float        # the figure allocated on (<= ε)
    upper_bound: float  # bounds ||W - Ŵ||_2 / ||W||_2 from above
    paper_error: float  # the paper's max_i figure, bounds it from below
    cost: Cost


@dataclass
class LayerTable:
    """Every (k, j) of one layer: its error figures per j and its cost, linear in j."""

    name: str
    original: Cost
    norm: float  # ||W||_2
    chunks: list[int]
    measure: str  # "bound" or "paper": which figure `best` compares with ε
    upper: dict[int, np.ndarray] = field(default_factory=dict)  # k -> upper bound at j = 1..r
    lower: dict[int, np.ndarray] = field(default_factory=dict)  # k -> the paper's figure at j = 1..r
    per_rank: dict[int, Cost] = field(default_factory=dict)     # k -> cost(j) = fixed + j * per_rank
    fixed: dict[int, Cost] = field(default_factory=dict)

    def errors(self, chunks: int) -> np.ndarray:
        return (self.upper if self.measure == "bound" else self.lower)[chunks]

    def choice(self, chunks: int, rank: int) -> Choice:
        step, base = self.per_rank[chunks], self.fixed[chunks]
        return Choice(chunks, rank, float(self.errors(chunks)[rank - 1]), float(self.upper[chunks][rank - 1]),
                      float(self.lower[chunks][rank - 1]),
                      Cost(base.params + rank * step.params, base.flops + rank * step.flops))

    def best(self, epsilon: float, kind: str, force: bool = False) -> Choice | None:
        """The cheapest (k, j) with error <= ε (ties: the smaller error); None if the layer pays more."""
        best = None
        for k in self.chunks:
            within = np.flatnonzero(self.errors(k) <= epsilon)
            if not within.size:
                continue
            option = self.choice(k, int(within[0]) + 1)  # errors fall with j: the first is the cheapest
            if best is None or (_amount(option.cost, kind), option.error) < (_amount(best.cost, kind), best.error):
                best = option
        if best is None or not force and _amount(best.cost, kind) >= _amount(self.original, kind):
            return None
        return best


def layer_table(name: str, spec: Conv | Linear, in_shape: Sequence[int], chunks: Sequence[int],
                measure: str = "bound") -> LayerTable:
    """Spectra of every chunking in `chunks` (valid for `spec`) and the costs of its factor chains."""
    matrix = alds_math.fold(spec)
    spectra = {k: alds_math.chunk_spectra(matrix, k) for k in chunks}
    norm = float(spectra[1][0, 0]) if 1 in spectra else alds_math.spectral_norm(matrix)
    table = LayerTable(name, cost(spec, in_shape), norm, list(chunks), measure)
    for k in chunks:
        table.upper[k], table.lower[k] = alds_math.error_bounds(spectra[k], norm)
        one = chain_cost(alds_math.alds_layout(spec, k, 1), in_shape)
        two = chain_cost(alds_math.alds_layout(spec, k, 2), in_shape) if alds_math.alds_max_rank(spec, k) >= 2 else one
        table.per_rank[k] = Cost(two.params - one.params, two.flops - one.flops)
        table.fixed[k] = Cost(one.params - table.per_rank[k].params, one.flops - table.per_rank[k].flops)
    return table


@dataclass
class Allocation:
    epsilon: float                           # the shared error the layers were chosen under
    choices: dict[str, Choice | None]        # None: the layer stays unfactored
    fraction: float                          # cost after / cost before, over these layers, in `kind`
    kind: str

    @property
    def max_error(self) -> float:
        """The largest error figure among the chosen layers (= epsilon after `allocate`)."""
        return max((c.error for c in self.choices.values() if c), default=0.0)


def at_epsilon(tables: Sequence[LayerTable], epsilon: float, kind: str, force: bool = False) -> Allocation:
    choices = {t.name: t.best(epsilon, kind, force) for t in tables}
    before = sum(_amount(t.original, kind) for t in tables)
    after = sum(_amount(c.cost if c else t.original, kind) for t, c in zip(tables, choices.values()))
    return Allocation(epsilon, choices, after / before if before else 1.0, kind)


def allocate(tables: Sequence[LayerTable], budget: Budget) -> Allocation:
    """The smallest shared ε whose allocation keeps `budget.fraction` of the layers' cost.

    Raises BudgetError (a PipelineError) with the smallest reachable fraction when even the
    largest ε (every layer at its cheapest choice) misses the budget.
    """
    thresholds = np.unique(np.concatenate([[0.0]] + [t.errors(k) for t in tables for k in t.chunks]))
    loosest = at_epsilon(tables, float(thresholds[-1]), budget.kind)
    if loosest.fraction > budget.fraction:
        raise BudgetError(f"budget {budget.kind}:{budget.fraction:g} cannot be met: the smallest reachable "
                          f"{budget.kind} fraction with these {len(tables)} layers is {loosest.fraction:.4f} "
                          "(every layer at its cheapest rank); ask for at least that, or factor more layers",
                          loosest.fraction)
    low, high = 0, len(thresholds) - 1  # invariant: thresholds[high] meets the budget
    while low < high:
        middle = (low + high) // 2
        if at_epsilon(tables, float(thresholds[middle]), budget.kind).fraction <= budget.fraction:
            high = middle
        else:
            low = middle + 1
    # the step to thresholds[high] made some layer cheaper, so a chosen error equals it: ε = max_error
    return at_epsilon(tables, float(thresholds[high]), budget.kind)


def _amount(value: Cost, kind: str) -> int:
    return getattr(value, kind)
