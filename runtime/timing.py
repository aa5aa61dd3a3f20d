"""Interleaved timing: every runner once per round (A B C A B C ...) after a warm-up.

Interleaving spreads slow drifts (thermal, a neighbour's load on a shared machine) over
all candidates alike, instead of penalising whichever ran last. Between two runners the
clock pauses for GAP_S: onnxruntime's, OpenMP's (torch) and TVM's thread pools spin for a
while after a call, and the next runner would share the cores with them. Measured on
ResNet-18, 2 threads: TVM tuned 67 ms right after onnxruntime, 30-35 ms alone or after a gap.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

GAP_S = 0.2  # untimed pause between runners: longer than the pools' spin-wait


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
                on_round: Callable[[int], None] | None = None, gap_s: float = GAP_S) -> list[Timing]:
    """Seconds from each timer, `rounds` times in turn, after `warmup` untimed turns."""
    for _ in range(warmup):
        for timer in timers:
            timer()
    samples: list[list[float]] = [[] for _ in timers]
    for r in range(rounds):
        for i, timer in enumerate(timers):
            if len(timers) > 1:
                time.sleep(gap_s)
            samples[i].append(timer() * 1e3)
        if on_round:
            on_round(r + 1)
    return [Timing(s) for s in samples]
