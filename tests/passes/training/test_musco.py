"""musco: recompression merges exactly, stages shrink ranks, and the stage report matches the graph."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import tensorfold as tf
from tensorfold.ir.errors import PipelineError
from tensorfold.ir.specs import Conv, Linear
from tensorfold.passes.decompose import cp_specs, svd_specs, tucker2_specs
from tensorfold.passes.decompose.recompress import (cp_kernel, recompress_cp, recompress_svd, recompress_tucker2)


def _dense(specs, x):
    """Run a chain of Conv / Linear specs with torch (written here, not tensorfold's runner)."""
    out = torch.from_numpy(x)
    for s in specs:
        w = torch.from_numpy(s.weight)
        b = None if s.bias is None else torch.from_numpy(s.bias)
        if isinstance(s, Linear):
            out = F.linear(out, w, b)
        else:
            (top, bottom), (left, right) = s.padding
            out = F.conv2d(F.pad(out, (left, right, top, bottom)), w, b, s.stride, 0, s.dilation, s.groups)
    return out.numpy()


def _conv(t=24, s=20, k=3, stride=1, seed=0) -> Conv:
    rng = np.random.default_rng(seed)
    return Conv(rng.normal(size=(t, s, k, k)).astype(np.float32), rng.normal(size=t).astype(np.float32),
                (stride, stride), ((1, 1), (1, 1)))


def test_tucker2_recompression_merges_exactly_at_full_rank_and_shrinks_below():
    conv = _conv(stride=2)
    chain = tucker2_specs(conv, (16, 12))
    x = np.random.default_rng(1).normal(size=(2, 20, 9, 9)).astype(np.float32)
    same = recompress_tucker2(chain, (16, 12))
    assert np.allclose(_dense(same, x), _dense(chain, x), rtol=1e-4, atol=1e-4)
    smaller = recompress_tucker2(chain, (10, 8))
    assert [s.weight.shape for s in smaller] == [(8, 20, 1, 1), (10, 8, 3, 3), (24, 10, 1, 1)]
    # the new outer factors are the old ones times new ones: first' = V_S^T U_S, last' = U_T V_T
    old_first, new_first = chain[0].weight[:, :, 0, 0].astype(np.float64), smaller[0].weight[:, :, 0, 0]
    v_s = np.linalg.lstsq(old_first.T, new_first.T, rcond=None)[0]
    assert np.allclose(v_s.T @ old_first, new_first, atol=1e-5)
    old_last, new_last = chain[2].weight[:, :, 0, 0].astype(np.float64), smaller[2].weight[:, :, 0, 0]
    v_t = np.linalg.lstsq(old_last, new_last, rcond=None)[0]
    assert np.allclose(old_last @ v_t, new_last, atol=1e-5)
    assert np.allclose(v_t.T @ v_t, np.eye(10), atol=1e-5)  # orthonormal: a Tucker factor of the core
    err = np.linalg.norm(_dense(smaller, x) - _dense(chain, x)) / np.linalg.norm(_dense(chain, x))
    assert 0 < err < 1


def test_svd_recompression_is_the_best_approximation_of_the_product():
    rng = np.random.default_rng(2)
    linear = Linear(rng.normal(size=(40, 30)).astype(np.float32), rng.normal(size=40).astype(np.float32))
    chain = svd_specs(linear, 20)
    product = chain[1].weight.astype(np.float64) @ chain[0].weight.astype(np.float64)
    exact = recompress_svd(chain, 20)
    assert np.allclose(exact[1].weight.astype(np.float64) @ exact[0].weight, product, atol=1e-4)
    low = recompress_svd(chain, 8)
    u, s, vt = np.linalg.svd(product)
    best = (u[:, :8] * s[:8]) @ vt[:8]
    assert np.allclose(low[1].weight.astype(np.float64) @ low[0].weight, best, atol=1e-4)
    assert np.array_equal(low[1].bias, chain[1].bias)


def test_cp_recompression_rebuilds_the_kernel_exactly_then_lowers_the_rank():
    conv = _conv(t=12, s=10, seed=3)
    chain = cp_specs(conv, 20, "cp3")
    x = np.random.default_rng(4).normal(size=(2, 10, 7, 7)).astype(np.float32)
    rebuilt = cp_kernel(chain)
    assert np.allclose(_dense([rebuilt], x), _dense(chain, x), rtol=1e-4, atol=1e-3)
    lower = recompress_cp(chain, 10, "cp3")
    assert lower[0].weight.shape[0] == 10 and lower[1].weight.shape == (10, 1, 3, 3)


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 48, 3, padding=1)
        self.c3 = nn.Conv2d(48, 48, 3, padding=1)
        self.fc = nn.Linear(48, 4)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        x = F.relu(self.c3(x))
        return self.fc(x.mean((2, 3)))


def _data(count=512, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, 1, 8, 8)).astype(np.float32)
    y = (x[:, 0, :4].mean((1, 2)) > 0).astype(np.int64) + 2 * (x[:, 0, :, :4].mean((1, 2)) > 0)
    return x, y


def test_musco_stages_shrink_ranks_and_report_the_graphs_flops():
    torch.manual_seed(0)
    graph = tf.capture(SmallNet().eval(), torch.zeros(1, 1, 8, 8))
    result, report = tf.compress(graph, "musco(method=tucker2, ratio=2, stages=3, finetune=(epochs=1, lr=0.001))",
                                 train_data=_data())
    step = report.passes[-1]
    stages = step.summary["stages"]
    assert len(stages) == 3
    assert stages[-1]["flops"] == result.layer_cost().flops  # the report's FLOPs are the graph's
    flops = [s["flops"] for s in stages]
    assert flops == sorted(flops, reverse=True) and flops[-1] < flops[0]
    c3 = [tuple(s["ranks"]["c3"]) for s in stages]
    assert c3[0] > c3[1] > c3[2]
    assert sum(1 for r in step.records if r.action == "recompressed") >= 2
    assert all("heldout after finetune" in s for s in stages)
    # each stage is still three convs per factorized layer
    kinds = [l.kind for l in result.layers()]
    assert kinds.count("conv") == 1 + 3 * 2


def test_musco_stops_at_the_flops_target():
    torch.manual_seed(0)
    graph = tf.capture(SmallNet().eval(), torch.zeros(1, 1, 8, 8))
    base = graph.layer_cost().flops
    result, report = tf.compress(graph, "musco(method=svd, ratio=2, stages=5, until=flops:0.6, include=c2|c3)",
                                 train_data=_data())
    stages = report.passes[-1].summary["stages"]
    assert result.layer_cost().flops <= 0.6 * base
    assert stages[-2]["flops"] > 0.6 * base if len(stages) > 1 else True
    assert len(stages) < 5


def test_musco_stops_inside_a_stage_at_the_flops_target():
    """Toward until=flops:f the last stage recompresses the largest savings first and stops once f is met,
    instead of cutting every layer's ranks and overshooting."""
    torch.manual_seed(0)
    graph = tf.capture(SmallNet().eval(), torch.zeros(1, 1, 8, 8))
    base = graph.layer_cost().flops
    pipeline = "musco(method=tucker2, ratio=2, stages=2, include=c2|c3, finetune=(epochs=1, seed=0){})"
    _, free = tf.compress(graph, pipeline.format(""), train_data=_data())
    full = [s["flops"] for s in free.passes[-1].summary["stages"]]
    assert len(full) == 2 and full[1] < full[0]
    fraction = (full[0] + full[1]) / 2 / base
    result, report = tf.compress(graph, pipeline.format(f", until=flops:{fraction:.6f}"), train_data=_data())
    step = report.passes[-1]
    flops = result.layer_cost().flops
    assert full[1] < flops <= fraction * base  # met, without the full stage's overshoot
    assert sum(1 for r in step.records if r.action == "recompressed") == 1
    assert any("FLOPs target met after recompressing 1 of 2 layers" in w for w in step.warnings)
    assert step.summary["stages"][-1]["flops"] == flops


def test_musco_bad_options_are_named():
    graph = tf.capture(SmallNet().eval(), torch.zeros(1, 1, 8, 8))
    data = _data(64)
    with pytest.raises(PipelineError, match="CP has no spectrum for EVBMF"):
        tf.compress(graph, "musco(method=cp)", train_data=data)
    with pytest.raises(PipelineError, match="until='flops:2'"):
        tf.compress(graph, "musco(until=flops:2)", train_data=data)
    with pytest.raises(PipelineError, match="musco fine-tunes after every stage"):
        tf.compress(graph, "musco")
    with pytest.raises(PipelineError, match="pass 'finetune' has no option epoch"):
        tf.compress(graph, "musco(finetune=(epoch=2))", train_data=data)


def test_musco_on_an_onnx_graph_recompresses_in_place(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "small.onnx"
    tf.capture(SmallNet().eval(), torch.zeros(1, 1, 8, 8)).save(str(path))
    graph = tf.load(str(path))
    result, report = tf.compress(graph, "musco(method=svd, ratio=1.5, stages=3, include=*c3*|*c2*)",
                                 train_data=_data())
    stages = report.passes[-1].summary["stages"]
    assert len(stages) == 3 and stages[-1]["flops"] == result.layer_cost().flops
    ranks = [s["ranks"] for s in stages]
    assert all(len(r) == 2 for r in ranks)
    assert all(a[0] > b[0] for a, b in zip(ranks[0].values(), ranks[2].values()))
    assert type(result).__name__ == "OnnxGraph"
    x, _ = _data(8, 3)
    assert np.isfinite(result.run({result.inputs[0].name: x})[result.output_names[0]]).all()
