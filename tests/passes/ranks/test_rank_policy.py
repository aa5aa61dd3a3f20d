"""Rank policies: ratio, energy, EVBMF, clamping, and the global budget
(docs/methods.md#rank-policies, docs/methods.md#pitfalls)."""
from __future__ import annotations

import numpy as np
import pytest

from tensorfold.ir.errors import PipelineError
from tensorfold.ir.specs import Conv, Cost, Linear, chain_cost, cost
from tensorfold.passes import decompose as dec
from tensorfold.passes.ranks import policy as rp


def conv(out, in_, k=3, groups=1, seed=0) -> Conv:
    rng = np.random.default_rng(seed)
    return Conv(rng.standard_normal((out, in_ // groups, k, k)).astype(np.float32), None,
                padding=((k // 2, k // 2),) * 2, groups=groups)


def linear_with_spectrum(values: np.ndarray, out: int, in_: int, seed: int = 0) -> Linear:
    rng = np.random.default_rng(seed)
    left = np.linalg.qr(rng.standard_normal((out, len(values))))[0]
    right = np.linalg.qr(rng.standard_normal((in_, len(values))))[0]
    return Linear(((left * values) @ right.T).astype(np.float64))


CONV = conv(64, 32)
LINEAR = Linear(np.random.default_rng(1).standard_normal((64, 48)))


@pytest.mark.parametrize("method,spec", [("svd", CONV), ("spatial_svd", CONV), ("cp3", CONV), ("cp4", CONV),
                                         ("tucker2", CONV), ("svd", LINEAR), ("tt", LINEAR),
                                         ("tucker2", conv(32, 32, groups=2))])
@pytest.mark.parametrize("rate", [2.0, 3.0, 5.0])
def test_ratio_gives_the_claimed_param_reduction(method, spec, rate):
    choice = rp.select_ranks(rp.Ratio(rate), method, spec)
    target = spec.weight.size / rate
    if choice.note:  # the formula went below the method's minimum rank (docs/methods.md#ratio)
        assert "minimum" in choice.note and min(choice.ranks) == min(rp.min_ranks(method, spec))
        return
    params = rp.factor_params(method, spec, choice.ranks)
    assert params <= target
    one_more = tuple(min(r + 1, b) for r, b in zip(choice.ranks, rp.max_ranks(method, spec)))
    assert rp.factor_params(method, spec, one_more) > target  # the largest ranks within rounding
    if method == "tucker2":  # musco: R_T = beta R_S with beta = max(0.8 T/S, 1)
        per_out, per_in = spec.out_channels // spec.groups, spec.weight.shape[1]
        beta = max(0.8 * per_out / per_in, 1.0)
        assert abs(choice.ranks[0] - beta * choice.ranks[1]) <= beta + 1


def test_ratio_reaches_the_minimum_rank_and_says_so():
    choice = rp.select_ranks(rp.Ratio(1000), "tucker2", CONV)
    assert choice.ranks == (8, 8) and "minimum" in choice.note
    assert rp.select_ranks(rp.Ratio(1000), "cp3", CONV).ranks == (2,)


@pytest.mark.parametrize("tau", [0.5, 0.9, 0.95, 0.99, 1.0])
def test_energy_picks_the_smallest_rank_reaching_tau(tau):
    values = np.sqrt(0.85 ** np.arange(30))
    spec = linear_with_spectrum(values, 40, 36)
    energies = values ** 2
    kept = np.cumsum(energies) / energies.sum()
    expected = max(int(np.argmax(kept >= tau - 1e-12)) + 1, 8)
    choice = rp.select_ranks(rp.Energy(tau), "svd", spec)
    assert choice.ranks == (expected,)
    if expected > 8:
        assert kept[expected - 1] >= tau - 1e-12 > kept[expected - 2]


def test_energy_for_tucker2_uses_both_unfoldings():
    rng = np.random.default_rng(3)
    core = rng.standard_normal((10, 12, 3, 3))
    kernel = np.einsum("abhw,ta,sb->tshw", core, np.linalg.qr(rng.standard_normal((40, 10)))[0],
                       np.linalg.qr(rng.standard_normal((24, 12)))[0])
    spec = Conv(kernel, None, padding=((1, 1), (1, 1)))
    assert rp.select_ranks(rp.Energy(1.0), "tucker2", spec).ranks == (10, 12)


def test_evbmf_policy_finds_the_planted_ranks_and_weakens():
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((60, 12)) @ rng.standard_normal((12, 40)) * 0.2 + 0.1 * rng.standard_normal((60, 40))
    spec = Linear(weight)
    assert rp.select_ranks(rp.Evbmf(), "svd", spec).ranks == (12,)
    assert rp.select_ranks(rp.Evbmf(weaken=0.5), "svd", spec).ranks == (40 - int(0.5 * 28),)
    noise = rp.select_ranks(rp.Evbmf(), "svd", Linear(rng.standard_normal((30, 20))))
    assert noise.ranks == (20,) and "rank 0" in noise.note  # musco: EVBMF rank 0 keeps full rank


def test_evbmf_policy_for_tucker2_gives_one_rank_per_unfolding():
    rng = np.random.default_rng(5)
    core = rng.standard_normal((10, 12, 3, 3))
    kernel = np.einsum("abhw,ta,sb->tshw", core, rng.standard_normal((48, 10)), rng.standard_normal((40, 12)))
    spec = Conv(kernel + 0.05 * rng.standard_normal(kernel.shape), None)
    assert rp.select_ranks(rp.Evbmf(), "tucker2", spec).ranks == (10, 12)


def test_clamping_is_reported():
    choice = rp.select_ranks(rp.FixedRank((100, 10)), "tucker2", CONV)
    assert choice.ranks == (64, 10)
    assert "R_T=100" in choice.note and "clamped to 64" in choice.note
    assert rp.select_ranks(rp.FixedRank(16), "svd", LINEAR) == rp.RankChoice((16,), None)


def test_max_and_min_ranks():
    assert rp.max_ranks("tucker2", conv(8, 64, k=1)) == (8, 8)  # R_S <= min(S, T k^2)
    assert rp.max_ranks("svd", LINEAR) == (48,)
    assert rp.min_ranks("tucker2", conv(8, 64, k=1)) == (8, 8)
    assert rp.min_ranks("svd", Linear(np.ones((4, 6)))) == (4,)  # lowered where the layer is smaller


@pytest.mark.parametrize("policy,match", [
    (rp.Energy(0.0), "energy"), (rp.Energy(1.5), "energy"), (rp.Ratio(0.0), "ratio"),
    (rp.FixedRank(0), "positive"), (rp.FixedRank((4,)), "2 of them"),
])
def test_bad_policies_raise(policy, match):
    with pytest.raises(PipelineError, match=match):
        rp.select_ranks(policy, "tucker2", CONV)


def test_cp_has_no_spectrum_policies():
    for policy in (rp.Energy(0.9), rp.Evbmf()):
        with pytest.raises(PipelineError, match="spectrum"):
            rp.select_ranks(policy, "cp3", CONV)
    with pytest.raises(PipelineError, match="unknown factorization method"):
        rp.select_ranks(rp.Ratio(2), "qr", CONV)
    with pytest.raises(dec.NotFactorable, match="depthwise conv"):
        rp.select_ranks(rp.Ratio(2), "tucker2", conv(8, 8, groups=8))


@pytest.mark.parametrize("text,policy", [
    (16, rp.FixedRank(16)), ((16, 8), rp.FixedRank((16, 8))), ("rank=16", rp.FixedRank(16)),
    ("16", rp.FixedRank(16)), ("(16, 8)", rp.FixedRank((16, 8))),
    ("rank=(16,8)", rp.FixedRank((16, 8))), ("ratio=2", rp.Ratio(2.0)), ("energy=0.95", rp.Energy(0.95)),
    ("evbmf", rp.Evbmf(1.0)), ("evbmf(weaken=0.8)", rp.Evbmf(0.8)),
])
def test_parse_rank_policy(text, policy):
    assert rp.parse_rank_policy(text) == policy


def test_parse_errors():
    for bad in ("nope", "ratio=x", "evbmf(weaken=)"):
        with pytest.raises(PipelineError):
            rp.parse_rank_policy(bad)
    for bad in ("params", "flops:0", "latency:0.5", "params:1.5"):
        with pytest.raises(PipelineError):
            rp.parse_budget(bad)
    assert rp.parse_budget("flops:0.25") == rp.Budget("flops", 0.25)


def test_factorization_pays_checks_params_and_flops():
    shape = (1, 32, 16, 16)
    assert rp.factorization_pays("tucker2", CONV, (16, 8), shape)
    assert not rp.factorization_pays("tucker2", CONV, rp.max_ranks("tucker2", CONV), shape)
    assert not rp.factorization_pays("svd", CONV, (60,), shape)
    factored = dec.svd_specs(LINEAR, 8)
    assert rp.reduces_cost(LINEAR, factored, (4, 48))


MODEL = {  # name -> (method, spec, input shape)
    "conv_a": ("tucker2", conv(48, 32, seed=1), (1, 32, 16, 16)),
    "conv_b": ("svd", conv(64, 48, k=1, seed=2), (1, 48, 16, 16)),
    "fc": ("svd", linear_with_spectrum(np.sqrt(0.7 ** np.arange(40)), 40, 64, seed=3), (1, 64)),
    "fc_flat": ("svd", linear_with_spectrum(np.ones(40), 40, 64, seed=4), (1, 64)),
}


def candidates():
    return [rp.layer_candidate(name, method, spec, shape) for name, (method, spec, shape) in MODEL.items()]


def realised_total(allocation, kind):
    total = 0
    for name, (method, spec, shape) in MODEL.items():
        ranks = allocation.ranks_by_layer[name]
        layer = [spec] if ranks is None else rp.METHODS[method].layout(spec, ranks)
        total += getattr(chain_cost(layer, shape), kind)
    return total


@pytest.mark.parametrize("kind,fraction", [("params", 0.5), ("params", 0.3), ("flops", 0.4)])
def test_budget_is_met_and_spent_on_the_cheapest_energy(kind, fraction):
    allocation = rp.allocate_budget(candidates(), rp.Budget(kind, fraction))
    original = sum(getattr(cost(spec, shape), kind) for _, spec, shape in MODEL.values())
    assert realised_total(allocation, kind) <= fraction * original
    assert allocation.fraction == pytest.approx(realised_total(allocation, kind) / original)
    assert allocation.fraction > fraction - 0.05  # greedy stops once the budget is met
    # a fast-decaying spectrum loses ranks before a flat one of the same size
    fc, flat = allocation.ranks_by_layer["fc"], allocation.ranks_by_layer["fc_flat"]
    assert fc is not None and (flat is None or fc[0] < flat[0])


def test_budget_counts_fixed_layers():
    fixed = Cost(params=100_000, flops=0)
    allocation = rp.allocate_budget(candidates(), rp.Budget("params", 0.9), fixed=fixed)
    original = fixed.params + sum(cost(spec, shape).params for _, spec, shape in MODEL.values())
    assert fixed.params + realised_total(allocation, "params") <= 0.9 * original


def test_unreachable_budget_says_the_smallest_fraction():
    with pytest.raises(rp.BudgetError) as caught:
        rp.allocate_budget(candidates(), rp.Budget("params", 0.01))
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, PipelineError)
    smallest = caught.value.smallest_fraction
    assert f"{smallest:.4f}" in str(caught.value)
    minimum = sum(min(cost(spec, shape).params,
                      chain_cost(rp.METHODS[m].layout(spec, rp.min_ranks(m, spec)), shape).params)
                  for m, spec, shape in MODEL.values())
    assert smallest == pytest.approx(minimum / sum(cost(s, sh).params for _, s, sh in MODEL.values()))
    allocation = rp.allocate_budget(candidates(), rp.Budget("params", smallest + 1e-9))  # just reachable
    assert allocation.fraction <= smallest + 1e-9
