"""Numbers first: every factorization at full rank reproduces its layer (run_specs, float64),
then structure (layer count, bias placement, layout shapes), then refusals and bad arguments."""
from __future__ import annotations

import numpy as np
import pytest
import tensorly as tl
from tensorly.decomposition import parafac

from tensorfold.ir.errors import PipelineError
from tensorfold.ir.specs import Conv, Linear, TTLinear, chain_cost, chain_out_shape
from tensorfold.ir.torch_modules import run_specs
from tensorfold.passes import decompose as dec
from tensorfold.passes.decompose.als_einsum import PartialCache, cp_als_einsum, mttkrp
from tensorfold.passes.ranks.policy import cost_function, max_ranks

RNG = np.random.default_rng(1234)  # builds the layer zoo at import; tests use their own seeds


def rel_error(reference: np.ndarray, approx: np.ndarray) -> float:
    return float(np.linalg.norm(reference - approx) / np.linalg.norm(reference))


def conv(out, in_, kernel, stride=None, padding=None, dilation=None, groups=1, bias=True) -> Conv:
    dims = len(kernel)
    weight = RNG.standard_normal((out, in_ // groups, *kernel)).astype(np.float32)
    return Conv(weight, RNG.standard_normal(out).astype(np.float32) if bias else None,
                stride=stride or (1,) * dims, padding=padding or ((0, 0),) * dims,
                dilation=dilation or (1,) * dims, groups=groups)


def linear(out, in_, bias=True) -> Linear:
    return Linear(RNG.standard_normal((out, in_)).astype(np.float32),
                  RNG.standard_normal(out).astype(np.float32) if bias else None)


CONV_ZOO = {
    "3x3": conv(6, 4, (3, 3), padding=((1, 1), (1, 1))),
    "3x3_stride2_nobias": conv(6, 4, (3, 3), stride=(2, 2), padding=((1, 1), (1, 1)), bias=False),
    "3x2_asym_pad_stride21": conv(5, 4, (3, 2), stride=(2, 1), padding=((0, 2), (1, 0))),
    "3x3_dilation2": conv(6, 4, (3, 3), padding=((2, 2), (2, 2)), dilation=(2, 2)),
    "3x3_dilation_asym": conv(4, 6, (3, 3), stride=(1, 2), padding=((2, 1), (0, 3)), dilation=(1, 2)),
    "3x3_groups2": conv(6, 4, (3, 3), padding=((1, 1), (1, 1)), groups=2),
    "1x1_stride2": conv(6, 4, (1, 1), stride=(2, 2)),
    "1x1_padded": conv(6, 4, (1, 1), padding=((1, 0), (2, 1))),
    "conv1d_k3": conv(6, 4, (3,), stride=(2,), padding=((1, 2),)),
    "conv1d_1x1": conv(5, 4, (1,), bias=False),
}
REFUSED = {"depthwise": conv(4, 4, (3, 3), groups=4), "prime_linear": linear(5, 7)}
LINEAR_ZOO = {"linear": linear(24, 30), "linear_nobias": linear(16, 12, bias=False), "linear_tt4": linear(16, 32)}


def applies(method: str, spec) -> bool:
    if isinstance(spec, Linear):
        return method in ("svd", "tt")
    if method == "tt":
        return False
    if method in ("spatial_svd", "cp4"):
        return spec.spatial_dims == 2 and min(spec.kernel_size) > 1
    return True


def factor(method: str, spec, ranks):
    if method == "svd":
        return dec.svd_specs(spec, ranks[0])
    if method == "spatial_svd":
        return dec.spatial_svd_specs(spec, ranks[0])
    if method == "tucker2":
        return dec.tucker2_specs(spec, ranks)
    if method in ("cp3", "cp4"):
        return dec.cp_specs(spec, ranks[0], method)
    return [dec.tt_spec(spec, ranks)]


def random_input(spec, batch=2, size=9, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if isinstance(spec, Linear):
        return rng.standard_normal((batch, 3, spec.in_features))
    return rng.standard_normal((batch, spec.in_channels, *([size] * spec.spatial_dims)))


CASES = [(m, name) for m in ("svd", "spatial_svd", "tucker2", "cp3", "cp4", "tt")
         for name, spec in {**CONV_ZOO, **LINEAR_ZOO}.items() if applies(m, spec)]


@pytest.mark.parametrize("method,name", CASES)
def test_full_rank_is_exact(method, name):
    spec = {**CONV_ZOO, **LINEAR_ZOO}[name]
    factored = factor(method, spec, max_ranks(method, spec))
    x = random_input(spec)
    assert rel_error(run_specs([spec], x), run_specs(factored, x)) < 1e-4
    # structure: the bias only on the last factor, weights stored as float32
    assert all(getattr(s, "bias", None) is None for s in factored[:-1])
    assert (factored[-1].bias is None) == (spec.bias is None)
    for s in factored:
        assert all(a.dtype == np.float32 for a in (s.cores if isinstance(s, TTLinear) else [s.weight]))


LAYOUTS = {
    "svd": lambda spec, ranks: dec.svd_layout(spec, ranks[0]),
    "spatial_svd": lambda spec, ranks: dec.spatial_svd_layout(spec, ranks[0]),
    "tucker2": dec.tucker2_layout,
    "cp3": lambda spec, ranks: dec.cp_layout(spec, ranks[0], "cp3"),
    "cp4": lambda spec, ranks: dec.cp_layout(spec, ranks[0], "cp4"),
    "tt": lambda spec, ranks: [dec.tt_layout(spec, ranks)],
}


@pytest.mark.parametrize("method,name", CASES)
def test_layout_and_cost_function_match_the_factors(method, name):
    spec = {**CONV_ZOO, **LINEAR_ZOO}[name]
    ranks = tuple(max(1, b // 2) for b in max_ranks(method, spec))
    factored = factor(method, spec, ranks)
    laid = LAYOUTS[method](spec, ranks)
    shapes = [[a.shape for a in (s.cores if isinstance(s, TTLinear) else [s.weight])] for s in factored]
    assert shapes == [[a.shape for a in (s.cores if isinstance(s, TTLinear) else [s.weight])] for s in laid]
    in_shape = random_input(spec).shape
    assert chain_cost(laid, in_shape) == cost_function(method, spec, in_shape)(ranks)
    assert chain_out_shape(factored, in_shape) == spec.out_shape(in_shape)


def test_svd_layer_order_stride_and_padding_on_first_conv():
    spec = CONV_ZOO["1x1_padded"]
    first, second = dec.svd_specs(spec, 3)
    assert first.padding == spec.padding and first.bias is None
    assert second.padding == ((0, 0), (0, 0)) and second.kernel_size == (1, 1)
    first, second = dec.svd_specs(CONV_ZOO["1x1_stride2"], 3)
    assert first.stride == (2, 2) and second.stride == (1, 1)


def test_svd_balanced_split_and_truncation_is_eckart_young():
    matrix = np.random.default_rng(1).standard_normal((7, 5))
    w1, w2 = dec.svd_factors(matrix, 3)
    np.testing.assert_allclose(np.linalg.norm(w1, axis=1), np.linalg.norm(w2, axis=0))
    u, s, vt = np.linalg.svd(matrix)
    np.testing.assert_allclose(w2 @ w1, (u[:, :3] * s[:3]) @ vt[:3], atol=1e-12)


def test_spatial_svd_truncation_equals_the_rank_r_kernel():
    spec = CONV_ZOO["3x3_dilation_asym"]
    kernel = spec.weight.astype(np.float64)
    T, S, kh, kw = kernel.shape
    u, s, vt = np.linalg.svd(kernel.transpose(1, 2, 0, 3).reshape(S * kh, T * kw))
    low = ((u[:, :2] * s[:2]) @ vt[:2]).reshape(S, kh, T, kw).transpose(2, 0, 1, 3)
    expected = Conv(low, spec.bias, spec.stride, spec.padding, spec.dilation)
    x = random_input(spec)
    assert rel_error(run_specs([expected], x), run_specs(dec.spatial_svd_specs(spec, 2), x)) < 1e-5


def test_tucker2_grouped_emits_grouped_convs_and_matches_partial_tucker():
    spec = CONV_ZOO["3x3_groups2"]
    first, core, last = dec.tucker2_specs(spec, (2, 1))
    assert (first.groups, core.groups, last.groups) == (2, 2, 2)
    assert core.stride == spec.stride and core.padding == spec.padding and core.dilation == spec.dilation
    low = []
    for kernel in np.split(spec.weight.astype(np.float64), 2):
        g, u_out, u_in = dec.tucker2_factors(kernel, (2, 1))
        low.append(tl.tenalg.multi_mode_dot(g, [u_out, u_in], modes=[0, 1]))
    expected = Conv(np.concatenate(low), spec.bias, spec.stride, spec.padding, spec.dilation, groups=2)
    x = random_input(spec)
    assert rel_error(run_specs([expected], x), run_specs([first, core, last], x)) < 1e-5


@pytest.mark.parametrize("variant", ["cp3", "cp4"])
def test_cp_als_recovers_an_exactly_low_rank_kernel(variant):
    rng = np.random.default_rng(2)
    factors = [rng.standard_normal((n, 3)) for n in (6, 5, 3, 3)]
    kernel = np.einsum("ar,br,cr,dr->abcd", *factors)
    spec = Conv(kernel.astype(np.float32), rng.standard_normal(6).astype(np.float32), stride=(1, 2),
                padding=((1, 0), (2, 1)), dilation=(1, 2))
    factored = dec.cp_specs(spec, 3, variant, init="svd", n_iter_max=300, tol=1e-12)
    assert len(factored) == (3 if variant == "cp3" else 4)
    assert all(s.groups == 3 for s in factored[1:-1])  # depthwise middle convs
    x = random_input(spec, size=10)
    assert rel_error(run_specs([spec], x), run_specs(factored, x)) < 1e-4


@pytest.mark.parametrize("shape", [(5, 4, 9), (4, 3, 2, 5)])
def test_mttkrp_equals_unfolding_times_khatri_rao(shape):
    rng = np.random.default_rng(6)
    tensor = rng.standard_normal(shape)
    factors = [rng.standard_normal((n, 7)) for n in shape]
    for mode in range(len(shape)):
        expected = tl.unfold(tensor, mode) @ tl.tenalg.khatri_rao(factors, skip_matrix=mode)
        np.testing.assert_allclose(mttkrp(tensor, factors, mode), expected, rtol=1e-10, atol=1e-10)


def test_mttkrp_reuses_the_first_contraction_only_for_the_same_factor():
    rng = np.random.default_rng(8)
    tensor = rng.standard_normal((10, 9, 4))
    factors = [rng.standard_normal((n, 5)) for n in tensor.shape]
    cache = PartialCache()
    np.testing.assert_allclose(mttkrp(tensor, factors, 1, cache), mttkrp(tensor, factors, 1), rtol=1e-12)
    reused = cache.entry[2]
    # mode 2 contracts mode 0 first too: the same GEMM result is reused, and still right
    np.testing.assert_allclose(mttkrp(tensor, factors, 2, cache), mttkrp(tensor, factors, 2), rtol=1e-12)
    assert cache.entry[2] is reused
    factors[0] = factors[0] * 2.0  # a new array: the cached contraction must not be used
    np.testing.assert_allclose(mttkrp(tensor, factors, 2, cache), mttkrp(tensor, factors, 2), rtol=1e-12)
    assert cache.entry[2] is not reused


def _swamp_tensor() -> np.ndarray:
    """A conv-like (T, S, k^2) tensor with Tucker structure: CP-ALS at rank 20 creeps along a swamp."""
    rng = np.random.default_rng(9)
    core = rng.standard_normal((6, 6, 9))
    tensor = np.einsum("ab,bck,dc->adk", rng.standard_normal((24, 6)), core, rng.standard_normal((20, 6)))
    return tensor + 0.01 * tensor.std() * rng.standard_normal(tensor.shape)


@pytest.mark.filterwarnings("ignore:Trying to compute SVD with n_eigenvecs")  # rank > a mode's size
def test_linesearch_fits_better_in_the_same_sweeps_and_reports_its_true_error():
    tensor = _swamp_tensor()
    plain = cp_als_einsum(tensor, 20, n_iter_max=60, tol=0, linesearch=False)
    searched = cp_als_einsum(tensor, 20, n_iter_max=60, tol=0, linesearch=True)
    truth = [np.linalg.norm(tensor - tl.cp_to_tensor((w, f))) / np.linalg.norm(tensor) for w, f, _ in (plain, searched)]
    assert searched[2][-1] == pytest.approx(truth[1], rel=1e-6)
    assert all(b <= a * (1 + 1e-9) for a, b in zip(searched[2], searched[2][1:]))  # a jump is kept only if better
    assert truth[1] < 0.6 * truth[0]  # 0.012 against 0.029 when written


@pytest.mark.parametrize("shape, rank, init", [((8, 6, 9), 8, "svd"), ((12, 10, 9), 5, "random"),
                                               ((6, 5, 3, 3), 10, "svd"), ((7, 9, 4), 12, "random")])
@pytest.mark.filterwarnings("ignore:Trying to compute SVD with n_eigenvecs")  # rank > a mode's size
def test_cp_als_fits_as_well_as_tensorly_parafac(shape, rank, init):
    rng = np.random.default_rng(7)
    low_rank = np.einsum("ar,br,cr->abcr", *[rng.standard_normal((n, 3)) for n in shape[:3]]).sum(-1)
    tensor = low_rank.reshape(shape[:3] + (1,) * (len(shape) - 3)) + 0.3 * rng.standard_normal(shape)
    opts = dict(init=init, n_iter_max=30, random_state=2)
    with tl.backend_context("numpy"):  # tol=0: both run exactly n_iter_max sweeps from the same init
        reference = tl.cp_to_tensor(parafac(tensor, rank, tol=0, normalize_factors=False, **opts))
    weights, factors, errors = cp_als_einsum(tensor, rank, tol=0, linesearch=False, **opts)
    ours = np.linalg.norm(tensor - tl.cp_to_tensor((weights, factors)))
    assert len(errors) == 30
    assert errors[-1] == pytest.approx(ours / np.linalg.norm(tensor), rel=1e-6)  # the error it reports is real
    assert ours <= np.linalg.norm(tensor - reference) * 1.01 + 1e-6


def test_exact_cp_reconstructs_any_tensor():
    tensor = np.random.default_rng(3).standard_normal((4, 3, 2, 5))
    weights, factors = dec.exact_cp(tensor)
    assert weights.size == dec.exact_cp_rank(tensor.shape) == 24
    np.testing.assert_allclose(tl.cp_to_tensor((weights, factors)), tensor, atol=1e-12)


def test_epc_lowers_sensitivity_within_the_als_error_bound():
    tensor = np.random.default_rng(4).standard_normal((8, 6, 9))
    rank, als_opts = 8, dict(init="random", n_iter_max=40, random_state=3)
    als_weights, als_factors = dec.cp_als(tensor, rank, **als_opts)
    epc_weights, epc_factors = dec.cp_epc(tensor, rank, **als_opts, epc_iter_max=100)
    als_error = np.linalg.norm(tensor - tl.cp_to_tensor((als_weights, als_factors)))
    epc_error = np.linalg.norm(tensor - tl.cp_to_tensor((epc_weights, epc_factors)))
    assert epc_error <= als_error * (1 + 1e-6)
    als_ss = dec.sensitivity(dec.balance(als_weights, als_factors))
    epc_ss = dec.sensitivity(dec.balance(epc_weights, epc_factors))
    assert epc_ss < 0.9 * als_ss  # compared after `balance`: raw ss depends on how scale is spread


def test_epc_through_cp_specs_keeps_the_layer_close():
    spec = CONV_ZOO["3x3"]
    x = random_input(spec)
    reference = run_specs([spec], x)
    als = rel_error(reference, run_specs(dec.cp_specs(spec, 6, "cp3", n_iter_max=30), x))
    epc = rel_error(reference, run_specs(dec.cp_specs(spec, 6, "cp3", "epc", n_iter_max=30, epc_iter_max=30), x))
    assert epc < 1.5 * als  # same kernel error bound; the output error follows it


def test_sensitivity_formula():
    rng = np.random.default_rng(5)
    a, b, c = rng.standard_normal((4, 2)), rng.standard_normal((3, 2)), rng.standard_normal((5, 2))
    expected = np.trace((a.T @ a) * (b.T @ b) + (b.T @ b) * (c.T @ c) + (a.T @ a) * (c.T @ c))
    assert dec.sensitivity([a, b, c]) == pytest.approx(expected)
    balanced = dec.balance(np.ones(2), [a, b, c])
    np.testing.assert_allclose(tl.cp_to_tensor((None, balanced)), tl.cp_to_tensor((None, [a, b, c])), atol=1e-12)
    assert dec.sensitivity(balanced) <= dec.sensitivity([a, b, c]) + 1e-9


def test_tt_modes_are_balanced_and_explicit_modes_work():
    assert dec.factorize_size(1000, 3) == (10, 10, 10)
    assert dec.factorize_size(4096, 3) == (16, 16, 16)
    assert dec.factorize_size(7, 3) == (1, 1, 7)
    assert dec.tt_modes(24, 30) == ((2, 3, 4), (5, 3, 2))
    spec = LINEAR_ZOO["linear_tt4"]
    tt = dec.tt_spec(spec, 4, in_modes=(2, 4, 4), out_modes=(4, 2, 2))
    assert [c.shape for c in tt.cores] == [(1, 4, 2, 4), (4, 2, 4, 4), (4, 2, 4, 1)]
    four = dec.tt_spec(spec, dec.tt_max_ranks(*dec.tt_modes(32, 16, d=4)), d=4)
    x = random_input(spec)
    assert len(four.cores) == 4 and rel_error(run_specs([spec], x), run_specs([four], x)) < 1e-4


def test_refusals_name_the_reason():
    depthwise = REFUSED["depthwise"]
    for call in (lambda: dec.tucker2_specs(depthwise, (1, 1)), lambda: dec.cp_specs(depthwise, 2),
                 lambda: dec.svd_specs(depthwise, 1)):
        with pytest.raises(dec.NotFactorable, match="depthwise conv"):
            call()
    assert dec.check_spatial_svd(CONV_ZOO["conv1d_k3"]) == "spatial svd needs a 2-D conv"
    assert "separable" in dec.check_spatial_svd(CONV_ZOO["1x1_stride2"])
    assert "prime" in dec.check_tt(REFUSED["prime_linear"])
    assert "cp4 needs a 2-D conv" in dec.check_cp(CONV_ZOO["conv1d_k3"], "cp4")
    assert dec.check_tucker2(LINEAR_ZOO["linear"]) is not None


@pytest.mark.parametrize("call,match", [
    (lambda: dec.svd_specs(LINEAR_ZOO["linear"], 0), "outside"),
    (lambda: dec.svd_specs(LINEAR_ZOO["linear"], 25), "outside"),
    (lambda: dec.svd_specs(LINEAR_ZOO["linear"], 2.5), "integer"),
    (lambda: dec.tucker2_specs(CONV_ZOO["3x3"], 3), "pair"),
    (lambda: dec.cp_specs(CONV_ZOO["3x3"], 2, "cp5"), "variant"),
    (lambda: dec.cp_specs(CONV_ZOO["3x3"], 2, method="nls"), "method"),
    (lambda: dec.tt_spec(LINEAR_ZOO["linear"], (3,)), "inner ranks"),
    (lambda: dec.tt_spec(LINEAR_ZOO["linear"], 2, in_modes=(5, 6), out_modes=(4, 5)), "do not factor"),
])
def test_bad_arguments_raise_pipeline_error(call, match):
    with pytest.raises(PipelineError, match=match):
        call()
