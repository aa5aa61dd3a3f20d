"""Interleaved timing: every runner once per round (A B C A B C ...) after a warm-up.

Interleaving spreads slow drifts (thermal, a neighbour's load on a shared machine) over
all candidates alike, instead of penalising whichever ran last.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


@dataclass
class Timing:
    samples_ms: list[float]

    @property
    def median_ms(self) -> float:
        return float(np.median(self.samples_ms))

    def to_json(self) -> dict[str, float | int]:
        values = np.asarray(self.samples_ms)
        q1, q3 = np.percentile(values, [25, 75])
        return {"median_ms": round(float(np.median(values)), 4), "iqr_ms": round(float(q3 - q1), 4),
                "min_ms": round(float(values.min()), 4), "max_ms": round(float(values.max()), 4),
                "rounds": int(values.size)}


def interleaved(timers: Sequence[Callable[[], float]], rounds: int, warmup: int,
                on_round: Callable[[int], None] | None = None) -> list[Timing]:
    """Seconds from each timer, `rounds` times in turn, after `warmup` untimed turns."""
    for _ in range(warmup):
        for timer in timers:
            timer()
    samples: list[list[float]] = [[] for _ in timers]
    for r in range(rounds):
        for i, timer in enumerate(timers):
            samples[i].append(timer() * 1e3)
        if on_round:
            on_round(r + 1)
    return [Timing(s) for s in samples]
