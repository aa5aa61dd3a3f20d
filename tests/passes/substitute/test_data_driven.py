"""Data-driven factorization (svd / tucker2 / cp with data=true) and the statistics it rests on."""
from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import tensorfold as tf
from tensorfold.ir.errors import InputShapeError, PipelineError
from tensorfold.ir.specs import Conv, Linear
from tensorfold.passes.decompose import sigma as sg
from tensorfold.passes.layer_data import patches, second_moments


class Net(nn.Module):
    """Convs with stride, asymmetric-free padding, dilation and groups, then a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 12, 3, padding=1)
        self.c2 = nn.Conv2d(12, 16, 3, stride=2, padding=2, dilation=2)
        self.c3 = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.c4 = nn.Conv2d(16, 24, 1)
        self.fc = nn.Linear(24 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        x = F.relu(self.c3(x))
        x = F.adaptive_avg_pool2d(F.relu(self.c4(x)), 4)
        return self.fc(x.flatten(1))


def _smooth_images(count: int, seed: int) -> np.ndarray:
    """Spatially correlated inputs: their patch statistics are far from white, so Sigma matters."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((count, 3, 8, 8)).astype(np.float32))
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    return (x + 0.05 * torch.randn_like(x)).numpy()


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture(scope="module")
def calibration():
    return [_smooth_images(32, seed) for seed in range(5)]


def _fx(net):
    return tf.capture(net, (torch.randn(2, 3, 16, 16),))


def _onnx(net, tmp_path):
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, (torch.randn(2, 3, 16, 16),), str(path), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "n"}})
    return tf.load(str(path))


def _im2col(x: np.ndarray, conv: nn.Conv2d) -> np.ndarray:
    """Patches by explicit loops (independent of F.unfold), rows (n, oh, ow), columns (c, i, j)."""
    (ph, pw), (sh, sw), (dh, dw), (kh, kw) = conv.padding, conv.stride, conv.dilation, conv.kernel_size
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    n, c, h, w = x.shape
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for b in range(n):
        for i in range(oh):
            for j in range(ow):
                rows.append(x[b, :, i * sh:i * sh + dh * kh:dh, j * sw:j * sw + dw * kw:dw].reshape(-1))
    return np.stack(rows)


def _conv_input(net, module, images):
    seen = {}
    def keep(module, inputs, output):  # returns None: a hook that returns a value replaces the output
        seen.setdefault("x", inputs[0].detach().numpy())

    handle = module.register_forward_hook(keep)
    with torch.no_grad():
        net(torch.from_numpy(images))
    handle.remove()
    return seen["x"]


@pytest.mark.parametrize("name", ["c1", "c2", "c3"])
def test_sigma_of_a_conv_matches_explicit_im2col(net, calibration, name):
    graph = _fx(net)
    layer = graph.layer(name)
    module = getattr(net, name)
    x = _conv_input(net, module, calibration[0])
    expected_rows = _im2col(x, module)
    got_rows = np.concatenate([r.numpy() for r in patches(layer.spec, x)])
    np.testing.assert_allclose(got_rows, expected_rows, atol=1e-6)
    moment = second_moments(graph, [layer], [{graph.inputs[0].name: calibration[0]}])[name]
    np.testing.assert_allclose(moment.sigma(), expected_rows.T @ expected_rows / len(expected_rows), rtol=1e-6,
                               atol=1e-9)


def test_sigma_accumulated_over_batches_equals_one_pass(net, calibration):
    graph = _fx(net)
    layers = [graph.layer(n) for n in ("c2", "fc")]
    name = graph.inputs[0].name
    batched = second_moments(graph, layers, [{name: c} for c in calibration])
    whole = second_moments(graph, layers, [{name: np.concatenate(calibration)}])
    for layer in layers:
        assert batched[layer.name].count == whole[layer.name].count
        np.testing.assert_allclose(batched[layer.name].sigma(), whole[layer.name].sigma(), rtol=1e-9, atol=1e-12)


def test_sigma_of_a_1d_conv_and_asymmetric_padding():
    spec = Conv(np.zeros((4, 3, 3), np.float32), None, stride=(2,), padding=((2, 1),), dilation=(1,))
    x = np.random.default_rng(0).standard_normal((2, 3, 9))
    rows = np.concatenate([r.numpy() for r in patches(spec, x)])
    padded = np.pad(x, ((0, 0), (0, 0), (2, 1)))
    out = spec.out_shape(x.shape)[2]
    expected = np.stack([padded[b, :, 2 * i:2 * i + 3].reshape(-1) for b in range(2) for i in range(out)])
    np.testing.assert_allclose(rows, expected)


def _sigma_for(net, module, images_list):
    rows = np.concatenate([_im2col(_conv_input(net, module, im), module) for im in images_list])
    return rows.T @ rows / len(rows)


def _replaced(report, name):
    return next(r for r in report.passes[-1].records if r.layer == name and r.action == "replaced")


def test_svd_data_is_the_closed_form_and_beats_plain_svd_on_the_data(net, calibration):
    graph = _fx(net)
    data_graph, data_report = tf.compress(graph, "svd(rank=6, data=true, damping=0, include=c2)", calibration=calibration)
    plain_graph, _ = tf.compress(graph, "svd(rank=6, include=c2)", calibration=calibration)
    # the fit batches are all but the held-out fifth (batch index 4)
    sigma = _sigma_for(net, net.c2, calibration[:4])
    weight = net.c2.weight.detach().numpy().astype(np.float64).reshape(16, -1)
    basis = np.linalg.eigh(weight @ sigma @ weight.T)[1][:, ::-1][:, :6]
    expected = basis @ basis.T @ weight

    def dense(g):
        first, second = (g.layer(n).spec for n in [l.name for l in g.layers()][1:3])
        return second.weight.reshape(16, -1).astype(np.float64) @ first.weight.reshape(6, -1)

    np.testing.assert_allclose(dense(data_graph), expected, atol=1e-4 * np.abs(expected).max())

    def data_error(approx):
        diff = weight - approx
        return np.sqrt(np.trace(diff @ sigma @ diff.T) / np.trace(weight @ sigma @ weight.T))

    assert data_error(dense(data_graph)) < data_error(dense(plain_graph)) * 0.95
    record = _replaced(data_report, "c2")
    assert record.details["data_error_heldout"] < record.details["weight_only_error_heldout"]


def test_reported_heldout_error_is_true(net, calibration):
    graph = _fx(net)
    compressed, report = tf.compress(graph, "tucker2(rank=(6,4), data=true, include=c2)", calibration=calibration)
    record = _replaced(report, "c2")
    held = calibration[4]
    x = torch.from_numpy(_conv_input(net, net.c2, held))
    reference = F.conv2d(x, net.c2.weight.detach(), None, 2, 2, 2).double()
    factor_specs = [l.spec for l in compressed.layers()][1:4]
    y = x.double()
    for spec in factor_specs:
        w = torch.from_numpy(spec.weight.astype(np.float64))
        y = F.conv2d(y, w, None, spec.stride, spec.padding[0][0], spec.dilation, spec.groups)
    measured = float(torch.linalg.norm((reference - y).detach()) / torch.linalg.norm(reference))
    assert record.details["data_error_heldout"] == pytest.approx(measured, rel=1e-3)


@pytest.mark.parametrize("passes", ["svd(rank=16, data=true, force=true, include=c4)",
                                    "tucker2(rank=(16,16), data=true, force=true, include=c2)",
                                    "cp(rank=144, data=true, force=true, include=c2, data_iter_max=2)",
                                    "svd(rank=8, data=true, force=true, include=c3)"])
def test_data_driven_methods_are_exact_at_full_rank(net, calibration, passes):
    graph = _fx(net)
    compressed, report = tf.compress(graph, passes, calibration=calibration)
    assert report.passes[-1].records and report.passes[-1].records[0].action == "replaced", report.table()
    x = _smooth_images(4, 99)
    name = graph.inputs[0].name
    want, got = graph.run({name: x})[graph.output_names[0]], compressed.run({name: x})[compressed.output_names[0]]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("shape", [(6, 5, 9), (6, 5, 3, 2)])
def test_cp_sigma_factor_updates_are_the_least_squares_minimisers(shape, monkeypatch):
    """Each CP-Sigma step against a brute-force solve: the linear map X -> A Z(X)^T L built column by column."""
    rng = np.random.default_rng(21)
    kernel = rng.standard_normal(shape)
    flat = kernel.reshape(shape[0], -1)
    patches_ = rng.standard_normal((flat.shape[1], 3 * flat.shape[1]))
    sigma = patches_ @ patches_.T / patches_.shape[1]
    lower = np.linalg.cholesky(sigma)                      # tr(D Sigma D^T) = ||D L||^2
    factors = [rng.standard_normal((n, 4)) for n in shape]

    def brute_force(mode):
        def image(x):
            parts = list(factors)
            parts[mode] = x
            return (sg._cp_kernel(parts).reshape(shape[0], -1) @ lower).ravel()
        size = factors[mode].size
        columns = [image(np.eye(size)[i].reshape(factors[mode].shape)) for i in range(size)]
        return np.linalg.lstsq(np.stack(columns, 1), (flat @ lower).ravel(), rcond=None)[0].reshape(factors[mode].shape)

    np.testing.assert_allclose(sg._solve_output(factors, flat, sigma), brute_force(0), rtol=1e-7, atol=1e-9)
    monkeypatch.setattr(sg, "CG_ITERATIONS", 500)
    for mode in range(1, len(shape)):
        want = brute_force(mode)
        np.testing.assert_allclose(sg._solve_factor_exact(mode, factors, flat @ sigma, sigma), want,
                                   rtol=1e-7, atol=1e-9)
        # CG runs its GEMM with Sigma in float32
        np.testing.assert_allclose(sg._solve_factor(mode, factors, flat @ sigma, sigma), want,
                                   rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("passes", ["tucker2(rank=(6,5), data=true, include=c2|c3)",
                                    "cp(rank=6, data=true, include=c2|c3)",
                                    "cp(rank=6, variant=cp4, data=true, include=c2)"])
def test_als_sigma_never_ends_above_its_start(net, calibration, passes):
    _, report = tf.compress(_fx(net), passes, calibration=calibration)
    records = [r for r in report.passes[-1].records if r.action == "replaced"]
    assert records
    for record in records:
        for history in record.details["sigma_error_history"]:
            assert history[-1] <= history[0] + 1e-12
            assert all(b <= a + 1e-12 for a, b in zip(history, history[1:]))
        assert record.details["data_error_heldout"] <= record.details["weight_only_error_heldout"] * 1.05


def test_both_front_ends_give_the_same_data_driven_factors(net, calibration, tmp_path):
    passes = "svd(rank=5, data=true, include=*c2*), tucker2(rank=(6,4), data=true, include=*c1*)"
    fx_graph, onnx_graph = _fx(net), _onnx(net, tmp_path)
    fx_out, fx_report = tf.compress(fx_graph, passes.replace("*c2*", "c2").replace("*c1*", "c1"),
                                    calibration=calibration)
    onnx_out, onnx_report = tf.compress(onnx_graph, passes, calibration=calibration)
    x = _smooth_images(3, 7)
    a = fx_out.run({fx_graph.inputs[0].name: x})[fx_out.output_names[0]]
    b = onnx_out.run({onnx_graph.inputs[0].name: x})[onnx_out.output_names[0]]
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * np.abs(a).max())
    saved = tmp_path / "out.onnx"
    onnx_out.save(str(saved))
    onnx.checker.check_model(onnx.load(str(saved)))


def test_data_pass_without_calibration_names_the_pass_and_the_remedy(net):
    with pytest.raises(PipelineError, match=r"tucker2.*data-driven.*calibration="):
        tf.compress(_fx(net), "tucker2(rank=(4,4), data=true)")


def test_calibration_of_the_wrong_shape_names_the_input_and_both_shapes(net):
    bad = [np.zeros((4, 3, 20, 20), np.float32)]
    with pytest.raises(InputShapeError, match=r"\(4, 3, 20, 20\).*\(2, 3, 16, 16\)"):
        tf.compress(_fx(net), "svd(rank=4, data=true)", calibration=bad)


def test_energy_policy_with_data_uses_the_output_spectrum(net, calibration):
    graph = _fx(net)
    _, report = tf.compress(graph, "svd(energy=0.9, data=true, include=fc)", calibration=calibration)
    rank = _replaced(report, "fc").details["ranks"][0]
    x = np.concatenate([graph.run({graph.inputs[0].name: c}, record=[graph.layer("fc").input])[graph.layer("fc").input]
                        for c in calibration[:4]]).astype(np.float64)
    weight = net.fc.weight.detach().numpy().astype(np.float64)
    energies = np.sort(np.linalg.eigvalsh(weight @ (x.T @ x / len(x)) @ weight.T))[::-1]
    expected = int(np.searchsorted(np.cumsum(energies) / energies.sum(), 0.9 * (1 - 1e-12))) + 1
    assert rank == max(expected, 8)


def test_cli_data_driven_on_a_trained_task_beats_the_weight_only_pass(tmp_path, capsys):
    """The README's command: the task brings its calibration split and its test set."""
    import json

    from tensorfold.cli import main

    accuracies = {}
    for label, passes in (("weights", "fold_bn, tucker2(ratio=2)"), ("data", "fold_bn, tucker2(ratio=2, data=true)")):
        report = tmp_path / f"{label}.json"
        assert main(["compress", "digits", "-p", passes, "-o", str(tmp_path / f"{label}.onnx"), "-q",
                     "--report", str(report)]) == 0
        extra = json.loads(report.read_text())["extra"]
        accuracies[label] = extra["test accuracy after"]
        before = extra["test accuracy before"]
    out = capsys.readouterr().out
    assert "test accuracy after" in out
    # measured: 0.68 (weights) vs 0.99 (data) of 0.997; the margin leaves room for other machines
    assert accuracies["data"] > accuracies["weights"] + 0.1
    assert accuracies["data"] > before - 0.05


def test_errors_use_the_first_128_samples_while_data_passes_fit_on_all(net, calibration):
    from tensorfold.passes.measure import ErrorInputs

    graph = _fx(net)
    feeds = [{graph.inputs[0].name: c} for c in calibration]  # 5 batches of 32
    assert len(ErrorInputs.for_graph(graph, feeds).calibration_for_errors) == 4
    _, report = tf.compress(graph, "svd(rank=6, data=true, include=c4)", calibration=calibration)
    # c4 is a 1x1 conv on an 8x8 map: 64 patch rows per image, 4 of the 5 batches fit (one held out)
    assert _replaced(report, "c4").details["calibration_rows"] == 4 * 32 * 64


def test_tucker2_data_on_a_1x1_conv_with_more_output_than_input_rank(net, calibration):
    """R_T > R_S * k^2: the closed form has fewer singular vectors than R_T (found on resnet18-digits)."""
    graph = _fx(net)
    compressed, report = tf.compress(graph, "tucker2(rank=(12,5), data=true, force=true, include=c4)",
                                     calibration=calibration)
    record = _replaced(report, "c4")
    assert record.details["ranks"] == [12, 5]
    shapes = [l.spec.weight.shape for l in compressed.layers() if l.name.startswith("c4")]
    assert shapes[0][0] == 5 and shapes[-1][1] == 12
    assert record.details["data_error_heldout"] <= record.details["weight_only_error_heldout"] * 1.05
