"""Selection on synthetic latency tables: slower replacements are never chosen, the chosen set meets the
budget with the least total error (brute force on small instances), an unreachable goal is not met."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from tensorfold.deployment.select import Group, Option, select


def _groups() -> list[Group]:
    # conv_a's "low_flops" has fewer FLOPs and the least error, but runs slower than the layer itself
    return [Group("conv_a", Option("original", 10.0, 0.0),
                  [Option("low_flops", 11.0, 0.01), Option("fast", 6.0, 0.5)]),
            Group("conv_b", Option("original", 10.0, 0.0), [Option("fast", 5.0, 0.2)])]


@pytest.mark.parametrize("budget", [11.0, 15.0, 16.0, 19.0, 25.0, 100.0])
def test_a_replacement_slower_than_its_layer_is_never_chosen(budget):
    chosen = select(_groups(), budget)
    assert chosen.choices["conv_a"].key != "low_flops"
    assert chosen.refused == {"conv_a": ["low_flops"]}
    if chosen.met:
        assert chosen.latency_ms <= budget


def test_the_cheapest_error_set_within_the_budget():
    chosen = select(_groups(), 16.0)
    assert {k: o.key for k, o in chosen.choices.items()} == {"conv_a": "original", "conv_b": "fast"}
    assert chosen.met and chosen.error == pytest.approx(0.2)


def test_unreachable_budget_takes_the_fastest_and_says_not_met():
    chosen = select(_groups(), 3.0)
    assert not chosen.met
    assert {k: o.key for k, o in chosen.choices.items()} == {"conv_a": "fast", "conv_b": "fast"}
    assert chosen.latency_ms == pytest.approx(11.0)


@pytest.mark.parametrize("seed", range(25))
def test_dynamic_programming_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    groups = []
    for g in range(rng.integers(2, 5)):
        original = float(rng.integers(4, 20)) * 0.5
        replacements = [Option(f"r{k}", float(rng.integers(1, 24)) * 0.5, float(rng.uniform(0.01, 1.0)))
                        for k in range(rng.integers(1, 5))]
        groups.append(Group(f"layer{g}", Option("original", original, 0.0), replacements))
    total = sum(g.original.latency_ms for g in groups)
    budget = float(rng.uniform(0.3, 1.0)) * total
    chosen = select(groups, budget, resolution_ms=0.5)

    best = None
    for combo in itertools.product(*(g.usable() for g in groups)):
        latency = sum(o.latency_ms for o in combo)
        if latency <= budget + 1e-9:
            error = sum(o.error for o in combo)
            best = error if best is None else min(best, error)
    if best is None:
        assert not chosen.met
    else:
        assert chosen.met
        assert chosen.latency_ms <= budget + 1e-9
        assert chosen.error == pytest.approx(best)
    for group in groups:  # never a replacement measured slower than (or as slow as) its layer
        assert chosen.choices[group.layer].latency_ms < group.original.latency_ms \
            or chosen.choices[group.layer].key == "original"


def test_latency_model_adds_the_rest_of_the_model_when_the_layers_sum_to_less():
    from tensorfold.deployment.run import LatencyModel

    model = LatencyModel(whole_ms=10.0, layers_ms=8.0)  # 2 ms of pooling, additions, call overhead
    assert model.predict(8.0) == pytest.approx(10.0) and model.predict(4.0) == pytest.approx(6.0)
    assert model.layer_budget(5.0) == pytest.approx(3.0) and model.predict(model.layer_budget(5.0)) == pytest.approx(5.0)


def test_latency_model_scales_the_layers_when_they_sum_to_more_than_the_model():
    # every layer timed in a loaded hour (or paying a call's overhead alone): 30 ms of layers, a 20 ms model.
    # A constant of -10 ms would predict 2 ms for halving every layer; in proportion it is 10 ms.
    from tensorfold.deployment.run import LatencyModel

    model = LatencyModel(whole_ms=20.0, layers_ms=30.0)
    assert model.predict(30.0) == pytest.approx(20.0) and model.predict(15.0) == pytest.approx(10.0)
    assert model.predict(model.layer_budget(10.0)) == pytest.approx(10.0)
    chosen = select([Group("a", Option("original", 15.0, 0.0), [Option("half", 7.5, 0.1)]),
                     Group("b", Option("original", 15.0, 0.0), [Option("half", 7.5, 0.2)])], model.layer_budget(16.0))
    assert {k: o.key for k, o in chosen.choices.items()} == {"a": "half", "b": "original"}
    assert chosen.met and model.predict(chosen.latency_ms) == pytest.approx(15.0)
