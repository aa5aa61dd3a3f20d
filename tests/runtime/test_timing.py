"""Interleaved timing: the order of the runners and the untimed pause between them."""
from __future__ import annotations

import time

from tensorfold.runtime.timing import interleaved


def test_runners_alternate_with_an_untimed_pause_between_them():
    calls: list[tuple[str, float]] = []

    def timer(name: str):
        def run() -> float:
            calls.append((name, time.perf_counter()))
            return 0.001
        return run

    timings = interleaved([timer("a"), timer("b")], rounds=3, warmup=1, gap_s=0.05)
    timed = calls[2:]  # after one warm-up turn of each
    assert [name for name, _ in timed] == ["a", "b"] * 3
    assert all(later - earlier >= 0.05 for (_, earlier), (_, later) in zip(timed, timed[1:]))
    assert [t.samples_ms for t in timings] == [[1.0] * 3, [1.0] * 3]  # the pause is not in the samples
