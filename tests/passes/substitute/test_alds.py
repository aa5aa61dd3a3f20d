"""The alds pass (Liebenwein et al. 2021) on FX and ONNX graphs: exact at full rank, the budget met
by the smallest shared ε, every layer's spectral error within its bound, the grouped structure
emitted, refusals with reasons."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import tensorfold as tf
from tensorfold.ir.errors import PipelineError
from tensorfold.ir.specs import Conv, Linear

warnings.filterwarnings("ignore", category=DeprecationWarning)


def _cnn() -> nn.Module:
    """3x3 convs with padding, stride 2 and dilation, then a Linear head (every layer an alds candidate)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(24, 24, 3, padding=2, dilation=2, bias=False), nn.ReLU(),
                         nn.Flatten(), nn.Linear(24 * 16, 20)).eval()


SHAPE = (1, 8, 8, 8)


def _graph(front: str, model: nn.Module, shape, tmp_path):
    x = torch.randn(*shape)
    if front == "fx":
        return tf.capture(model, x)
    path = str(tmp_path / "m.onnx")
    torch.onnx.export(model, (x,), path, dynamo=False, input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return tf.load(path)


def _outputs(graph, x: np.ndarray) -> np.ndarray:
    return graph.run({graph.inputs[0].name: x})[graph.output_names[0]]


def _rel(reference: np.ndarray, value: np.ndarray) -> float:
    reference = np.asarray(reference, np.float64)
    return float(np.linalg.norm(reference - np.asarray(value, np.float64)) / np.linalg.norm(reference))


def _spectral(matrix: np.ndarray) -> float:
    return float(np.linalg.norm(matrix, 2))


def _dense_pair(first, second) -> np.ndarray:
    """W_hat (T, S*kh*kw) of grouped conv -> 1x1 (or Linear -> Linear), written out per chunk."""
    if isinstance(first, Linear):
        return second.weight.astype(np.float64) @ first.weight.astype(np.float64)
    k, rank = first.groups, first.out_channels // first.groups
    outer = second.weight.astype(np.float64).reshape(second.out_channels, -1)
    inner = first.weight.astype(np.float64).reshape(first.out_channels, -1)
    return np.concatenate([outer[:, i * rank:(i + 1) * rank] @ inner[i * rank:(i + 1) * rank] for i in range(k)],
                          axis=1)


def _pairs(graph, result, records):
    """(original spec, (first, second)) for every replaced layer; the graphs hold candidate layers only."""
    emitted, pairs = iter(result.layers()), []
    by_name = {r.layer: r for r in records}
    for layer in graph.layers():
        if by_name[layer.name].action == "replaced":
            pairs.append((layer.spec, (next(emitted).spec, next(emitted).spec), by_name[layer.name]))
        else:
            next(emitted)
    return pairs


@pytest.mark.parametrize("front", ["fx", "onnx"])
@pytest.mark.parametrize("chunks", [0, 4])
def test_full_rank_is_exact(front, chunks, tmp_path):
    graph = _graph(front, _cnn(), SHAPE, tmp_path)
    result, report = tf.compress(graph, f"alds(epsilon=0, force=true, chunks={chunks})")
    records = report.passes[0].records
    assert [r.action for r in records] == ["replaced"] * 4, records
    probe = np.random.default_rng(1).standard_normal((2, *SHAPE[1:])).astype(np.float32)
    error = _rel(_outputs(graph, probe), _outputs(result, probe))
    assert error < 1e-5, f"full rank on {front}: relative output error {error}"
    for record in records:
        assert record.details["upper_bound"] == 0 and record.details["spectral_error"] < 1e-6
        assert record.error_random < 1e-5
    if chunks:
        convs = [r for r in records if r.details["chunks"] != 1]
        assert len(convs) == 3 and all(r.details["chunks"] == chunks for r in convs)
    if front == "onnx":
        onnx.checker.check_model(result.to_onnx())


@pytest.mark.parametrize("front, kind", [("fx", "params"), ("fx", "flops"), ("onnx", "params")])
def test_budget_is_met_by_the_smallest_epsilon_within_every_bound(front, kind, tmp_path):
    graph = _graph(front, _cnn(), SHAPE, tmp_path)
    calibration = [np.random.default_rng(5).standard_normal((2, *SHAPE[1:])).astype(np.float32)]
    result, report = tf.compress(graph, f"alds(budget={kind}:0.4)", calibration=calibration)
    alds = report.passes[0]
    before, after = graph.layer_cost(), result.layer_cost()
    fraction = getattr(after, kind) / getattr(before, kind)
    assert fraction <= 0.4 and alds.summary["budget_reached"] == pytest.approx(fraction, rel=1e-12)
    replaced = alds.changed
    assert len(replaced) >= 3
    # ε is the largest per-layer bound, and every layer's real spectral error lies within its bound
    assert alds.summary["epsilon"] == max(r.details["upper_bound"] for r in replaced)
    for spec, (first, second), record in _pairs(graph, result, alds.records):
        matrix = spec.weight.astype(np.float64).reshape(spec.weight.shape[0], -1)
        measured = _spectral(matrix - _dense_pair(first, second)) / _spectral(matrix)
        assert record.details["spectral_error"] == pytest.approx(measured, rel=1e-6, abs=1e-9)
        assert record.details["error_allocated"] == record.details["upper_bound"] <= alds.summary["epsilon"]
        assert record.details["paper_error"] - 1e-6 <= measured <= record.details["upper_bound"] + 1e-6
        assert record.error_random is not None and record.error_calibration is not None
        assert (record.params_before, record.params_after) == (spec.weight.size + (0 if spec.bias is None else spec.bias.size),
                                                              first.weight.size + second.weight.size
                                                              + (0 if second.bias is None else second.bias.size))
    # the smallest: a slightly smaller shared ε misses the budget
    tighter, _ = tf.compress(graph, f"alds(epsilon={alds.summary['epsilon'] * (1 - 1e-9)!r})")
    assert getattr(tighter.layer_cost(), kind) / getattr(before, kind) > 0.4


def test_papers_figure_allocates_but_bounds_nothing(tmp_path):
    """error=paper: torchprune's allocation on max_i s_j+1(W_i)/||W||_2; each layer's real error is at
    least that figure and, with k > 1 chunks, above the shared ε, which the report must not hide."""
    graph = _graph("fx", _cnn(), SHAPE, tmp_path)
    result, report = tf.compress(graph, "alds(budget=params:0.4, error=paper)")
    alds = report.passes[0]
    assert result.layer_cost().params / graph.layer_cost().params <= 0.4
    assert alds.summary["epsilon"] == max(r.details["paper_error"] for r in alds.changed)
    assert "lower bound" in alds.summary["error_measure"]
    chunked = [r for r in alds.changed if r.details["chunks"] > 1]
    assert chunked, "the paper's figure favours chunks on random weights"
    for record in alds.changed:
        assert record.details["error_allocated"] == record.details["paper_error"]
        assert record.details["paper_error"] - 1e-6 <= record.details["spectral_error"] <= record.details["upper_bound"] + 1e-6
    assert max(r.details["spectral_error"] for r in chunked) > alds.summary["epsilon"]


def test_tighter_budget_gives_larger_epsilon(tmp_path):
    graph = _graph("fx", _cnn(), SHAPE, tmp_path)
    epsilons = [tf.compress(graph, f"alds(budget=params:{f})")[1].passes[0].summary["epsilon"] for f in (0.7, 0.4, 0.15)]
    assert epsilons[0] < epsilons[1] < epsilons[2], epsilons


@pytest.mark.parametrize("front", ["fx", "onnx"])
def test_emitted_grouped_conv_has_k_groups_over_all_input_channels(front, tmp_path):
    graph = _graph(front, _cnn(), SHAPE, tmp_path)
    result, report = tf.compress(graph, "alds(budget=params:0.6, chunks=4)")
    records = [r for r in report.passes[0].changed if r.details["chunks"] == 4]
    assert len(records) == 3
    grouped = [l.spec for l in result.layers() if isinstance(l.spec, Conv) and l.spec.groups > 1]
    assert [(c.groups, c.in_channels) for c in grouped] == [(4, 8), (4, 16), (4, 24)]
    assert [c.out_channels for c in grouped] == [4 * r.details["rank"] for r in records]
    if front == "onnx":  # counted from the ONNX nodes themselves
        model = result.to_onnx()
        groups = [a.i for n in model.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group"]
        assert sorted(g for g in groups if g > 1) == [4, 4, 4]


def _planted_conv(chunks: int, rank: int, channels: int = 32, seed: int = 0) -> nn.Conv2d:
    """A 3x3 conv whose every input-channel chunk has its own rank-`rank` kernel (plus 0.1 % noise):
    rank chunks*rank as a whole, the structure ALDS's k chunks capture and one SVD does not."""
    rng = np.random.default_rng(seed)
    cols = channels // chunks * 9
    matrix = np.concatenate([rng.standard_normal((channels, rank)) @ rng.standard_normal((rank, cols))
                             for _ in range(chunks)], axis=1)
    matrix += 1e-3 * matrix.std() * rng.standard_normal(matrix.shape)
    conv = nn.Conv2d(channels, channels, 3, padding=1)
    conv.weight.data = torch.from_numpy(matrix.reshape(channels, channels, 3, 3).astype(np.float32))
    return conv


def test_planted_chunks_are_found_and_beat_one_svd(tmp_path):
    graph = _graph("fx", nn.Sequential(_planted_conv(chunks=4, rank=3)).eval(), (1, 32, 8, 8), tmp_path)
    _, report = tf.compress(graph, "alds(budget=params:0.2)")
    record = report.passes[0].changed[0]
    assert (record.details["chunks"], record.details["rank"]) == (4, 4)
    assert record.details["spectral_error"] < 1e-2
    _, svd_report = tf.compress(graph, "alds(budget=params:0.2, chunks=1)")
    assert svd_report.passes[0].changed[0].details["spectral_error"] > 0.3


@pytest.mark.parametrize("pipeline, message", [
    ("alds(budget=bytes:0.5)", r"alds: bad budget 'bytes:0.5'"),
    ("alds(budget=params:1.5)", r"alds: bad budget"),
    ("alds", r"alds: give budget="),
    ("alds(budget=params:0.5, epsilon=0.1)", r"exactly one"),
    ("alds(budget=params:0.5, force=true)", r"force=true applies with epsilon= only"),
    ("alds(budget=params:0.5, chunks=-2)", r"chunks=-2"),
    ("alds(epsilon=-1)", r"epsilon=-1"),
    ("alds(epsilon=0.5, error=frobenius)", r"alds: error='frobenius': use bound or paper"),
])
def test_bad_options_are_errors_naming_the_pass(pipeline, message, tmp_path):
    graph = _graph("fx", _cnn(), SHAPE, tmp_path)
    with pytest.raises(PipelineError, match=message):
        tf.compress(graph, pipeline)


def test_over_tight_budget_is_an_error_with_the_reachable_fraction(tmp_path):
    graph = _graph("fx", _cnn(), SHAPE, tmp_path)
    with pytest.raises(PipelineError, match=r"alds: budget params:0.001 cannot be met.*smallest reachable") as info:
        tf.compress(graph, "alds(budget=params:0.001)")
    reachable = info.value.smallest_fraction
    assert 0.001 < reachable < 0.2
    result, report = tf.compress(graph, f"alds(budget=params:{reachable * 1.0001:.6f})")  # just enough
    assert all(r.details["rank"] == 1 for r in report.passes[0].changed)
    assert result.layer_cost().params / graph.layer_cost().params <= reachable * 1.0001


def test_unsupported_layers_are_skipped_with_reasons(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8, padding=1), nn.Conv2d(8, 12, 3, groups=2, padding=1),
                          nn.ConvTranspose2d(12, 12, 2, stride=2), nn.Conv2d(12, 10, 3), nn.Flatten(),
                          nn.Linear(10 * 14 * 14, 16)).eval()
    graph = _graph("fx", model, (1, 8, 8, 8), tmp_path)
    _, report = tf.compress(graph, "alds(epsilon=0.9, chunks=8)")
    reasons = {r.layer: (r.action, r.reason) for r in report.passes[0].records}
    assert "depthwise" in reasons["0"][1] and "grouped conv (groups=2)" in reasons["1"][1]
    assert "transposed conv" in reasons["2"][1]
    assert reasons["3"] == ("skipped", "chunks=8 does not divide the 12 input channels")
    linear = next(r for r in report.passes[0].records if r.layer == "5")
    assert linear.action == "replaced" and linear.details["chunks"] == 1 and "Linear: k=1" in linear.details["note"]


def test_bounds_sandwich_the_error_and_the_papers_figure_is_only_a_lower_bound():
    from tensorfold.passes.decompose import alds as alds_math

    rng = np.random.default_rng(3)
    block = rng.standard_normal((6, 2)) @ rng.standard_normal((2, 9))  # rank 2
    twin = Conv(np.concatenate([block, block], axis=1).reshape(6, 2, 3, 3).astype(np.float32))  # W = [A, A]
    random = Conv(rng.standard_normal((12, 8, 3, 3)).astype(np.float32))
    for spec in (twin, random):
        matrix = spec.weight.astype(np.float64).reshape(spec.weight.shape[0], -1)
        for k in alds_math.chunk_choices(spec):
            upper, lower = alds_math.error_bounds(alds_math.chunk_spectra(matrix, k), _spectral(matrix))
            for j in range(1, alds_math.alds_max_rank(spec, k) + 1):
                first, second = alds_math.alds_specs(spec, k, j)
                error = _spectral(matrix - _dense_pair(first, second)) / _spectral(matrix)
                assert lower[j - 1] - 1e-6 <= error <= upper[j - 1] + 1e-6, (k, j)
    # [A, A] at k=2, j=1: both chunks leave the same residual, so the error is sqrt(2) x the paper's max_i
    matrix = twin.weight.astype(np.float64).reshape(6, -1)
    upper, lower = alds_math.error_bounds(alds_math.chunk_spectra(matrix, 2), _spectral(matrix))
    error = _spectral(matrix - _dense_pair(*alds_math.alds_specs(twin, 2, 1))) / _spectral(matrix)
    assert error == pytest.approx(np.sqrt(2) * lower[0], rel=1e-5) and error == pytest.approx(upper[0], rel=1e-5)
