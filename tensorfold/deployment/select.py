"""Selection: per layer one choice (the original or a replacement) under a latency budget, least total error.

An exact multiple-choice knapsack by dynamic programming over latency discretized in steps of
`resolution_ms` (costs rounded up, so a chosen set's predicted latency never exceeds the budget).
A replacement whose measured latency is not below its layer's original is dropped before the
search, whatever its FLOPs. When even the fastest choices miss the budget, the fastest set is
returned with `met=False`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

STEPS = 2000  # default resolution: the budget in 2000 steps


@dataclass(frozen=True)
class Option:
    """One choice for a layer: `key` names it ("original" or e.g. "tucker2(16,8)")."""

    key: str
    latency_ms: float
    error: float


@dataclass
class Group:
    layer: str
    original: Option
    replacements: list[Option]

    def usable(self) -> list[Option]:
        """The original plus every replacement measured faster than it."""
        return [self.original] + [o for o in self.replacements if o.latency_ms < self.original.latency_ms]

    def refused(self) -> list[Option]:
        return [o for o in self.replacements if o.latency_ms >= self.original.latency_ms]


@dataclass
class Selection:
    choices: dict[str, Option]             # layer -> chosen option
    budget_ms: float                       # the latency budget for the candidate layers together
    met: bool
    resolution_ms: float
    refused: dict[str, list[str]] = field(default_factory=dict)  # layer -> replacements not faster than it

    @property
    def latency_ms(self) -> float:
        return float(sum(o.latency_ms for o in self.choices.values()))

    @property
    def error(self) -> float:
        return float(sum(o.error for o in self.choices.values()))


def select(groups: Sequence[Group], budget_ms: float, resolution_ms: float | None = None) -> Selection:
    """Least total error with Σ latency <= budget_ms (latencies rounded up to `resolution_ms`)."""
    refused = {g.layer: [o.key for o in g.refused()] for g in groups if g.refused()}
    options = [g.usable() for g in groups]
    fastest = {g.layer: min(opts, key=lambda o: (o.latency_ms, o.error)) for g, opts in zip(groups, options)}
    if not groups:
        return Selection({}, budget_ms, budget_ms >= 0, resolution_ms or 0.0, refused)
    if budget_ms <= 0 or sum(o.latency_ms for o in fastest.values()) > budget_ms:
        return Selection(fastest, budget_ms, False, 0.0, refused)  # no search: the fastest set
    resolution = resolution_ms or budget_ms / STEPS
    capacity = int(math.floor(budget_ms / resolution + 1e-9))
    inf = float("inf")
    best = np.zeros(capacity + 1)                      # best[c]: least error using at most c steps
    picks: list[np.ndarray] = []
    for opts in options:
        new = np.full(capacity + 1, inf)
        pick = np.full(capacity + 1, -1, dtype=np.int64)
        for index, option in enumerate(opts):
            steps = int(math.ceil(option.latency_ms / resolution - 1e-9))
            if steps > capacity:
                continue
            candidate = np.full(capacity + 1, inf)
            candidate[steps:] = best[:capacity + 1 - steps] + option.error
            better = candidate < new
            new[better], pick[better] = candidate[better], index
        best = new
        picks.append(pick)
    if not np.isfinite(best[capacity]):  # the rounding up lost the only feasible sets: take the fastest
        return Selection(fastest, budget_ms, False, resolution, refused)
    chosen, c = {}, capacity
    for group, opts, pick in zip(reversed(groups), reversed(options), reversed(picks)):
        option = opts[int(pick[c])]
        chosen[group.layer] = option
        c -= int(math.ceil(option.latency_ms / resolution - 1e-9))
    ordered = {g.layer: chosen[g.layer] for g in groups}
    return Selection(ordered, budget_ms, True, resolution, refused)
