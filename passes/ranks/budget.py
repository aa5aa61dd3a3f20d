"""Global rank allocation under a params or FLOPs budget (docs/methods.md#budget).

Zhang et al. (2015) maximise prod_l sum_{a <= r_l} sigma_{l,a} under a FLOP budget by greedy
removal. Here every layer starts at its maximum ranks and the allocator repeatedly removes
the rank step with the smallest loss of retained spectral energy, log(E(r) / E(r-1)), per
param or FLOP saved, until the whole model fits. The log ratio makes the loss scale free
per layer and telescopes to the product objective. A layer whose factors would cost more
than the layer itself counts at its original cost (and is reported as kept).

Re-exported by `tensorfold.passes.ranks.policy`.
"""
from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from tensorfold.ir.errors import PipelineError
from tensorfold.ir.specs import Cost, Spec, chain_cost, cost

BUDGET_KINDS = ("params", "flops")


@dataclass(frozen=True)
class Budget:
    kind: str        # "params" or "flops"
    fraction: float  # of the original model's total


class BudgetError(PipelineError, ValueError):
    """The budget is below what the smallest allowed ranks reach; says that fraction."""

    def __init__(self, message: str, smallest_fraction: float):
        super().__init__(message)
        self.smallest_fraction = smallest_fraction


def parse_budget(text: str) -> Budget:
    """"params:0.5" or "flops:0.3" as a Budget."""
    kind, _, number = str(text).replace(" ", "").partition(":")
    try:
        fraction = float(number)
    except ValueError:
        fraction = float("nan")
    if kind not in BUDGET_KINDS or not 0 < fraction <= 1:
        raise PipelineError(f"bad budget {text!r}: use params:<fraction> or flops:<fraction>, fraction in (0, 1]")
    return Budget(kind, fraction)


def cost_function(method: str, spec: Spec, in_shape: Sequence[int]) -> Callable[[Sequence[int]], Cost]:
    """Exact cost of the factor chain at any ranks, from `chain_cost` at ranks in {1, 2}^n.

    Every factor layer's params and FLOPs are bilinear in (at most two) ranks, so the chain's
    cost is multilinear in the ranks and the corner values determine it exactly; this avoids
    building the layout (with its arrays) at every step of the allocator.
    """
    from .policy import METHODS, max_ranks  # policy re-exports this module

    layout = METHODS[method].layout
    choices = [(1, 2) if bound >= 2 else (1,) for bound in max_ranks(method, spec)]
    corners = {corner: chain_cost(layout(spec, corner), in_shape) for corner in itertools.product(*choices)}

    def at(ranks: Sequence[int]) -> Cost:
        params = flops = 0
        for corner, corner_cost in corners.items():
            weight = 1
            for rank, value, options in zip(ranks, corner, choices):
                if len(options) == 2:
                    weight *= (rank - 1) if value == 2 else (2 - rank)
            params += weight * corner_cost.params
            flops += weight * corner_cost.flops
        return Cost(params, flops)

    return at


@dataclass
class LayerCandidate:
    name: str
    energies: list[np.ndarray]  # per rank: the energy each rank step keeps, descending
    cost: Callable[[Sequence[int]], Cost]  # of the factor chain at given ranks
    original: Cost
    min_ranks: tuple[int, ...]
    max_ranks: tuple[int, ...]


def layer_candidate(name: str, method: str, spec: Spec, in_shape: Sequence[int]) -> LayerCandidate:
    """A candidate for `allocate_budget`: the spectra and costs of `method` on `spec`."""
    from .policy import max_ranks, min_ranks, rank_spectra

    return LayerCandidate(name, rank_spectra(method, spec), cost_function(method, spec, in_shape),
                          cost(spec, in_shape), min_ranks(method, spec), max_ranks(method, spec))


@dataclass
class Allocation:
    ranks_by_layer: dict[str, tuple[int, ...] | None]  # None: keep the layer unfactored
    fraction: float  # reached total / original total, in the budget's kind


def allocate_budget(candidates: Sequence[LayerCandidate], budget: Budget, fixed: Cost = Cost()) -> Allocation:
    """Ranks for all candidates at once so that the model's params or FLOPs, counting `fixed`
    (the layers not factored), reach `budget.fraction` of the original.

    Raises BudgetError with the smallest reachable fraction when even the minimum ranks miss it.
    """
    if budget.kind not in BUDGET_KINDS or not 0 < budget.fraction <= 1:
        raise PipelineError(f"bad budget {budget!r}: kind params or flops, fraction in (0, 1]")

    def amount(c: Cost) -> int:
        return getattr(c, budget.kind)

    originals = [amount(c.original) for c in candidates]
    total_original = amount(fixed) + sum(originals)
    target = budget.fraction * total_original
    smallest = amount(fixed) + sum(min(o, amount(c.cost(c.min_ranks))) for o, c in zip(originals, candidates))
    if smallest > target:
        reachable = smallest / max(total_original, 1)
        raise BudgetError(f"budget {budget.kind}:{budget.fraction:g} cannot be met: the smallest reachable "
                          f"{budget.kind} fraction with these layers and minimum ranks is {reachable:.4f}; "
                          "ask for at least that, or factor more layers",
                          reachable)

    ranks = [list(c.max_ranks) for c in candidates]
    costs = [amount(c.cost(r)) for c, r in zip(candidates, ranks)]
    kept = [[np.concatenate([[0.0], np.cumsum(e)]) for e in c.energies] for c in candidates]  # E(r)
    total = amount(fixed) + sum(min(o, c) for o, c in zip(originals, costs))
    versions, heap, order = [0] * len(candidates), [], itertools.count()

    def push_moves(i: int) -> None:
        versions[i] += 1
        for d, rank in enumerate(ranks[i]):
            if rank <= candidates[i].min_ranks[d]:
                continue
            lower = ranks[i].copy()
            lower[d] -= 1
            saving = costs[i] - amount(candidates[i].cost(lower))
            if saving <= 0:
                continue
            before, after = kept[i][d][rank], kept[i][d][rank - 1]
            loss = math.log(before / after) if after > 0 else 0.0
            heapq.heappush(heap, (loss / saving, next(order), i, d, versions[i], saving))

    for i in range(len(candidates)):
        push_moves(i)
    while total > target and heap:
        _, _, i, d, version, saving = heapq.heappop(heap)
        if version != versions[i]:
            continue
        effective_before = min(originals[i], costs[i])
        ranks[i][d] -= 1
        costs[i] -= saving
        total += min(originals[i], costs[i]) - effective_before
        push_moves(i)

    chosen = {c.name: (tuple(r) if cost_ < original else None)
              for c, r, cost_, original in zip(candidates, ranks, costs, originals)}
    return Allocation(chosen, total / max(total_original, 1))
