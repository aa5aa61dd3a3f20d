"""admm_lowrank: ADMM reaches a planted low-rank optimum; projections are what they claim; the workflow's
.tfz file holds exactly the compressed weights."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import tensorfold as tf
from tensorfold.ir.errors import PipelineError
from tensorfold.passes.decompose.projection import project_rank, project_rank_sigma, project_tt
from tensorfold.runtime.evaluate import predict


def _planted(seed=0, rank=4, count=4096):
    rng = np.random.default_rng(seed)
    w = (rng.normal(size=(32, rank)) @ rng.normal(size=(rank, 48)) / 4).astype(np.float32)
    x = rng.normal(size=(count, 48)).astype(np.float32)
    return w, x, (x @ w.T).astype(np.float32)


def _dense(graph) -> np.ndarray:
    """The product of the graph's Linear weights (written here, not with tensorfold's helpers)."""
    total = None
    for layer in graph.layers():
        w = layer.spec.weight.astype(np.float64)
        total = w if total is None else w @ total
    return total


def test_admm_converges_to_a_planted_low_rank_least_squares_solution():
    planted, x, y = _planted()
    torch.manual_seed(0)
    graph = tf.capture(nn.Sequential(nn.Linear(48, 32, bias=False)).eval(), torch.zeros(1, 48))
    result, report = tf.compress(graph, "admm_lowrank(rank=4, iters=10, epochs_per_iter=2, lr=0.01, rho=0.01, "
                                        "force=true, finetune=(epochs=1, lr=0.001))", train_data=(x, y))
    step = report.passes[-1]
    residual = step.records[0].details["primal_residual"]
    assert len(residual) == 10 and residual[-1] < residual[0] / 10
    assert sum(b < a for a, b in zip(residual, residual[1:])) >= 8  # it falls, iteration after iteration
    layers = result.layers()
    assert [l.spec.weight.shape for l in layers] == [(4, 48), (32, 4)]  # two Linears through rank exactly 4
    found = _dense(result)
    assert np.linalg.matrix_rank(found, tol=1e-5 * np.linalg.norm(found)) == 4
    assert np.linalg.norm(found - planted) / np.linalg.norm(planted) < 0.05
    assert step.summary["held-out MSE after fine-tuning"] < 0.01 * step.summary["held-out MSE before"]


def test_rank_projection_is_eckart_young():
    m = np.random.default_rng(1).normal(size=(20, 30))
    p = project_rank(m, 5)
    s = np.linalg.svd(m, compute_uv=False)
    assert np.linalg.matrix_rank(p) == 5
    assert np.linalg.norm(m - p) == pytest.approx(math.sqrt(np.sum(s[5:] ** 2)), rel=1e-10)


def test_sigma_projection_is_eckart_young_in_the_data_norm():
    rng = np.random.default_rng(4)
    m = rng.normal(size=(20, 30))
    a = rng.normal(size=(30, 30))
    sigma = a @ a.T / 30 + 0.1 * np.eye(30)
    values, vectors = np.linalg.eigh(sigma)
    root = (vectors * np.sqrt(values)) @ vectors.T  # Sigma^(1/2): the data norm is ||(M - Z) Sigma^(1/2)||_F
    p = project_rank_sigma(m, 5, sigma)
    whitened = np.linalg.svd(m @ root, compute_uv=False)
    assert np.linalg.matrix_rank(p) == 5
    assert np.linalg.norm((m - p) @ root) == pytest.approx(math.sqrt(np.sum(whitened[5:] ** 2)), rel=1e-8)
    # and it is the whitened truncation mapped back, not merely as good
    u, s, vt = np.linalg.svd(m @ root)
    assert np.allclose(p, (u[:, :5] * s[:5]) @ vt[:5] @ np.linalg.inv(root), atol=1e-8)


def test_admm_in_the_data_norm_finds_the_rank_the_inputs_have():
    # a full-rank layer whose inputs span 6 of their 48 directions: rank 6 loses nothing on these inputs,
    # yet the weight itself is far from rank 6 (a weight-only projection loses most of the outputs)
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(4096, 6)) @ rng.normal(size=(6, 48)) + 1e-3 * rng.normal(size=(4096, 48))).astype(np.float32)
    layer = nn.Linear(48, 32, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(rng.normal(size=(32, 48)) / 7))
    y = layer(torch.from_numpy(x)).detach().numpy()  # the layer is the exact solution: MSE 0 to start from
    trained = tf.capture(nn.Sequential(layer).eval(), torch.zeros(1, 48))
    steps = "iters=4, epochs_per_iter=1, lr=0.001, rho=0.01, force=true, finetune=(epochs=1, lr=0.0001)"
    results = {}
    for label, options in (("data", "energy=0.999, data=true"), ("weights", "rank=6")):
        result, report = tf.compress(trained, f"admm_lowrank({options}, {steps})", train_data=(x, y),
                                     calibration=[x[:1024]])
        results[label] = (result, report.passes[-1])
    data_step, weight_step = results["data"][1], results["weights"][1]
    assert data_step.records[0].details["ranks"] == [6]  # the rank the inputs have, found from the data
    assert [l.spec.weight.shape for l in results["data"][0].layers()] == [(6, 48), (32, 6)]
    assert data_step.summary["held-out MSE after ADMM (W := Z)"] < 1e-3 * float(np.mean(y ** 2))
    assert weight_step.summary["held-out MSE after ADMM (W := Z)"] > 10 * data_step.summary[
        "held-out MSE after ADMM (W := Z)"]


def test_tt_rounding_drops_what_tt_svd_says():
    rng = np.random.default_rng(2)
    # two modes: one unfolding, so the error is exactly its dropped singular values
    m = rng.normal(size=(12, 20))
    out_modes, in_modes = (3, 4), (4, 5)
    rounded = project_tt(m, [5], in_modes, out_modes)
    unfolding = m.reshape(3, 4, 4, 5).transpose(0, 2, 1, 3).reshape(12, 20)
    s = np.linalg.svd(unfolding, compute_uv=False)
    assert np.linalg.norm(m - rounded) == pytest.approx(math.sqrt(np.sum(s[5:] ** 2)), rel=1e-8)
    # three modes: each bond of the result has at most its rank, and the error is within the TT-SVD bound
    m = rng.normal(size=(24, 30))
    out_modes, in_modes = (2, 3, 4), (2, 3, 5)
    rounded = project_tt(m, [3, 4], in_modes, out_modes)
    tensor = m.reshape(*out_modes, *in_modes).transpose(0, 3, 1, 4, 2, 5)
    bound = 0.0
    for k, rank in enumerate([3, 4]):
        rows = int(np.prod([out_modes[j] * in_modes[j] for j in range(k + 1)]))
        bound += np.sum(np.linalg.svd(tensor.reshape(rows, -1), compute_uv=False)[rank:] ** 2)
        result_unfolding = rounded.reshape(*out_modes, *in_modes).transpose(0, 3, 1, 4, 2, 5).reshape(rows, -1)
        assert np.linalg.matrix_rank(result_unfolding, tol=1e-8) <= rank
    assert np.linalg.norm(m - rounded) <= math.sqrt(bound) * (1 + 1e-9)


def test_admm_to_tt_format_gives_a_tt_chain():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1024, 64)).astype(np.float32)
    y = (x @ rng.normal(size=(64, 36)) / 8).astype(np.float32)
    torch.manual_seed(0)
    graph = tf.capture(nn.Sequential(nn.Linear(64, 36)).eval(), torch.zeros(1, 64))
    result, report = tf.compress(graph, "admm_lowrank(format=tt, rank=2, iters=3, finetune=(epochs=1))",
                                 train_data=(x, y))
    modules = {type(m).__name__ for m in result.to_torch().modules()}
    assert "TTLinearModule" in modules and "Linear" not in modules  # the Linear became a TT chain
    record = report.passes[-1].records[0]
    assert record.action == "replaced" and record.details["ranks"] == [2, 2]
    assert record.params_after < record.params_before


def test_workflow_tfz_round_trip_holds_the_compressed_weights(tmp_path):
    from tensorfold.runtime.tasks import image_mlp

    task = image_mlp.make_task("image-mlp-32", side=32, epochs=30)
    graph = tf.capture(task.model(verbose=False), torch.zeros(task.input_shape))
    x, y = task.train_data()
    compressed, _ = tf.compress(graph, "admm_lowrank(ratio=4, iters=2, batch=128, finetune=(epochs=1)), kmeans, "
                                       "huffman", train_data=(x, y))
    path = tmp_path / "image.tfz"
    compressed.save(str(path))
    loaded = tf.load(str(path))
    for a, b in zip(compressed.layers(), loaded.layers()):
        assert np.array_equal(a.spec.weight, b.spec.weight)
    test_x, test_y = task.test_data()
    reported = task.evaluate(predict(compressed, test_x), test_y)["psnr"]
    assert task.evaluate(predict(loaded, test_x), test_y)["psnr"] == pytest.approx(reported, abs=1e-6)


def test_admm_bad_input_is_named():
    graph = tf.capture(nn.Sequential(nn.Linear(7, 13)).eval(), torch.zeros(1, 7))
    data = (np.zeros((16, 7), np.float32), np.zeros((16, 13), np.float32))
    with pytest.raises(PipelineError, match="admm_lowrank trains on the task's loss"):
        tf.compress(graph, "admm_lowrank")
    with pytest.raises(PipelineError, match="format='cp'"):
        tf.compress(graph, "admm_lowrank(format=cp)", train_data=data)
    with pytest.raises(PipelineError, match="energy= keeps output energy on calibration data; give data=true"):
        tf.compress(graph, "admm_lowrank(energy=0.9)", train_data=data)
    with pytest.raises(PipelineError, match="data=true projects in the Sigma-norm by SVD; it needs format=svd"):
        tf.compress(graph, "admm_lowrank(format=tt, data=true)", train_data=data)
    with pytest.raises(PipelineError, match="is data-driven and got no calibration data"):
        tf.compress(graph, "admm_lowrank(data=true, rank=2)", train_data=data)
    # 7 -> 13: primes, no TT shape factors this layer: skipped with the reason, graph unchanged
    result, report = tf.compress(graph, "admm_lowrank(format=tt, rank=2)", train_data=data)
    step = report.passes[-1]
    assert step.records[0].action == "skipped" and "tt" in step.records[0].reason
    assert "graph returned unchanged" in step.warnings[0]
    assert result.layers()[0].spec.weight.shape == (13, 7)
