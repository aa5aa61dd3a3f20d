"""The ratio two whole models are compared by (deploy's whole-model check, int8 against fp32): the median of
per-round ratios, its 95 % interval, and rounds added until it is precise."""
from __future__ import annotations

import numpy as np
import pytest

from tensorfold.deployment import latency as lat
from tensorfold.runtime import timing


class _ScriptedRunner:
    """A runner whose calls take scripted times (seconds): the timing source is the one thing replaced."""

    input_names = ["x"]

    def __init__(self, times):
        self.times = iter(times)

    def timer(self, inputs):
        return lambda: next(self.times)

    def close(self):
        pass


class _ScriptedEngine:
    emulated = False

    def __init__(self, times: dict):
        self.times = times

    def prepare(self, graph, label):
        return _ScriptedRunner(self.times[graph.name])


class _Graph:
    def __init__(self, name):
        self.name = name
        self.inputs = [type("Input", (), {"shape": (1, 4)})()]


def _load(rng, rounds, spread):
    """Per-round load factors a neighbour puts on both calls of a round, plus each call's own jitter."""
    shared = 1 + rng.exponential(0.5, rounds)
    return shared, lambda: 1 + spread * rng.standard_normal(rounds)


def test_under_a_load_both_calls_of_a_round_share_the_paired_ratio_scatters_less():
    paired, of_medians = [], []
    for seed in range(200):
        rng = np.random.default_rng(seed)
        shared, jitter = _load(rng, lat.END_TO_END_ROUNDS, 0.05)
        base, other = 8.0 * shared * jitter(), 4.6 * shared * jitter()
        ratio = lat.paired_ratio(base, other)
        assert ratio["low"] <= ratio["median"] <= ratio["high"] and ratio["rounds"] == lat.END_TO_END_ROUNDS
        paired.append(ratio["median"])
        of_medians.append(np.median(other) / np.median(base))
    assert np.mean(paired) == pytest.approx(0.575, rel=0.01)
    assert np.std(paired) < 0.8 * np.std(of_medians)


def test_the_interval_covers_the_true_ratio_and_narrows_with_rounds():
    rng = np.random.default_rng(1)
    widths = []
    for rounds in (20, 80):
        shared, jitter = _load(rng, rounds, 0.05)
        ratio = lat.paired_ratio(8.0 * shared * jitter(), 4.6 * shared * jitter())
        assert ratio["low"] <= 0.575 <= ratio["high"]
        widths.append(ratio["precision"])
    assert widths[1] < widths[0]


def _times(base_ms, other_ms):
    return {"base": [t / 1e3 for t in base_ms], "other": [t / 1e3 for t in other_ms]}


@pytest.fixture
def no_gap(monkeypatch):
    monkeypatch.setattr(timing, "GAP_S", 0.0)


def test_a_steady_pair_stops_after_one_block_and_a_noisy_one_gets_rounds_until_the_cap(no_gap):
    graphs = {"base": _Graph("base"), "other": _Graph("other")}
    n = lat.WARMUP + lat.RATIO_MAX_ROUNDS
    steady = lat.end_to_end(graphs, _ScriptedEngine(_times([8.0] * n, [4.6] * n)), ratio=("base", "other"))
    assert steady["ratio"]["rounds"] == lat.END_TO_END_ROUNDS and steady["ratio"]["median"] == pytest.approx(0.575)
    assert steady["ratio"]["of"] == "other / base" and steady["other"]["rounds"] == lat.END_TO_END_ROUNDS

    rng = np.random.default_rng(2)
    noisy = lat.end_to_end(graphs, _ScriptedEngine(_times(8.0 * (1 + 0.5 * rng.random(n)),
                                                          4.6 * (1 + 0.5 * rng.random(n)))), ratio=("base", "other"))
    assert noisy["ratio"]["rounds"] == lat.RATIO_MAX_ROUNDS and noisy["ratio"]["precision"] > lat.RATIO_PRECISION
    assert noisy["base"]["rounds"] == noisy["other"]["rounds"] == lat.RATIO_MAX_ROUNDS

    plain = lat.end_to_end(graphs, _ScriptedEngine(_times([8.0] * n, [4.6] * n)))
    assert "ratio" not in plain and plain["base"]["rounds"] == lat.END_TO_END_ROUNDS


def test_a_cached_timing_without_its_ratio_is_measured_again(no_gap, tmp_path):
    from tensorfold.targets import get_target

    graphs = {"base": _Graph("base"), "other": _Graph("other")}
    n = lat.WARMUP + lat.RATIO_MAX_ROUNDS
    cache = lat.LatencyCache(get_target("x86"), "scripted", 1, directory=str(tmp_path))
    # what a deploy before the paired ratio stored: medians only (a ratio of 0.517 for this pair)
    cache.put({"pair": {"base": {"median_ms": 8.99}, "other": {"median_ms": 4.64}}})
    timed, cached = lat.cached_end_to_end(graphs, _ScriptedEngine(_times([8.0] * n, [4.6] * n)), cache, "pair",
                                          ratio=("base", "other"))
    assert not cached and timed["ratio"]["median"] == pytest.approx(0.575)
    again, cached = lat.cached_end_to_end(graphs, _ScriptedEngine({}), cache, "pair", ratio=("base", "other"))
    assert cached and again["ratio"] == timed["ratio"]


def _paired(median, low, high, rounds=40):
    return {"median": median, "low": low, "high": high, "rounds": rounds}


def test_the_speed_verdict_rests_on_the_paired_ratio_not_on_the_ratio_of_medians():
    from tensorfold.deployment.report import verdict_speed

    # tf.measure's medians say 4.1x; the paired ratio, timed until precise, says 3.85x: not met
    speed = verdict_speed(4.0, None, 8.2, 2.0, _paired(0.26, 0.255, 0.265))
    assert not speed["met"] and speed["speedup"] == pytest.approx(1 / 0.26)
    assert speed["of_medians"] == pytest.approx(4.1) and speed["interval"] == pytest.approx([1 / 0.265, 1 / 0.255])
    assert "3.85x" in speed["text"] and "noise" not in speed["text"]
    # an interval that spans the goal is said, whichever side the median falls
    close = verdict_speed(4.0, None, 8.0, 2.0, _paired(0.249, 0.24, 0.26))
    assert close["met"] and "within this machine's noise" in close["text"]
    # no paired timing (emulated times): tf.measure's medians
    assert verdict_speed(4.0, None, 8.2, 2.0, None)["met"]
    # a latency goal is checked on the deployed model's median
    assert not verdict_speed(None, 1.9, 8.2, 2.0, _paired(0.2, 0.19, 0.21))["met"]


def test_the_blocks_follow_the_rounds_asked_and_stop_at_the_cap(no_gap):
    graphs = {"base": _Graph("base"), "other": _Graph("other")}
    rng = np.random.default_rng(3)
    n = lat.WARMUP + 12
    noisy = lat.end_to_end(graphs, _ScriptedEngine(_times(8.0 * (1 + 0.5 * rng.random(n)),
                                                          4.6 * (1 + 0.5 * rng.random(n)))),
                           rounds=3, ratio=("base", "other"), max_rounds=10)
    assert noisy["ratio"]["rounds"] == 10  # 3 + 3 + 3 + 1: never past the cap
