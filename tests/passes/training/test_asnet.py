"""asnet (Cui et al. 2020): the active subspace of planted gradients, the cut network's head on the projected
features, true reports, both front ends, and the refusals."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tensorfold as tf
from tensorfold.ir.errors import PipelineError
from tensorfold.passes.decompose.active_subspace import active_subspace

RANK = 3


def _principal_sines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sines of the principal angles between the column spaces of a and b."""
    qa, _ = np.linalg.qr(a)
    qb, _ = np.linalg.qr(b)
    cosines = np.clip(np.linalg.svd(qa.T @ qb, compute_uv=False), 0, 1)
    return np.sqrt(1 - cosines ** 2)


def test_active_subspace_finds_the_planted_directions_and_its_eigenvalues():
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(40, RANK))
    gradients = rng.normal(size=(500, RANK)) @ directions.T + 1e-4 * rng.normal(size=(500, 40))
    space = active_subspace(gradients, energy=0.999)
    assert space.rank == RANK
    assert _principal_sines(space.basis, directions).max() < 1e-3
    assert np.allclose(space.basis.T @ space.basis, np.eye(RANK), atol=1e-10)
    covariance = gradients.T @ gradients / len(gradients)
    assert np.allclose(space.eigenvalues[:5], np.linalg.eigvalsh(covariance)[::-1][:5], rtol=1e-8)
    assert space.energy >= 0.999
    assert active_subspace(gradients, rank=5).rank == 5
    with pytest.raises(PipelineError, match="rank=41 must lie in 1..40"):
        active_subspace(gradients, rank=41)


class Planted(nn.Module):
    """After fc1 the network depends on z only through a rank-3 map (fc2's weight), so its loss gradients
    with respect to z span that map's 3 row directions: the active subspace is known."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 48), nn.Linear(48, 24), nn.Linear(24, 4)
        with torch.no_grad():
            self.fc2.weight.copy_(torch.randn(24, RANK) @ torch.randn(RANK, 48) / 4)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _labelled(model: nn.Module, count: int = 3000, seed: int = 0):
    x = np.random.default_rng(seed).normal(size=(count, 12)).astype(np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()  # the network's own labels: it scores 100 %
    return x, y


@pytest.mark.parametrize("front_end", ["fx", "onnx"])
def test_asnet_finds_the_planted_subspace_and_its_head_keeps_the_predictions(front_end, tmp_path):
    model = Planted().eval()
    graph = tf.capture(model, torch.zeros(1, 12))
    if front_end == "onnx":
        graph.save(str(tmp_path / "planted.onnx"))
        graph = tf.load(str(tmp_path / "planted.onnx"))
    x, y = _labelled(model)
    name = {"fx": "{}", "onnx": "/{}/Gemm"}[front_end].format  # the layer names each front end gives
    result, report = tf.compress(graph, f"asnet(layer={name('fc1')}, energy=0.9999, hidden=32, epochs=30, lr=0.003)",
                                 train_data=(x, y))
    step = report.passes[-1]
    (record,) = step.records
    assert record.details["rank"] == RANK and record.details["energy kept"] >= 0.9999
    assert record.details["replaced layers"] == [name("fc2"), name("fc3")]
    assert type(result) is type(graph)
    # the projection is the first new Linear: its rows span fc2's row space
    projection = next(l for l in result.layers() if l.kind == "linear" and l.spec.weight.shape == (RANK, 48))
    w2 = model.fc2.weight.detach().numpy().astype(np.float64)
    assert _principal_sines(projection.spec.weight.T.astype(np.float64), w2.T).max() < 1e-3
    # params and FLOPs counted from the graphs; the head beats chance by far on fresh samples
    assert record.params_before == graph.total_params() - 48 * 12 - 48
    assert record.params_after == result.total_params() - 48 * 12 - 48
    x_test, y_test = _labelled(model, 1000, seed=1)
    out = result.run({result.inputs[0].name: x_test})[result.output_names[0]]
    assert np.mean(out.argmax(1) == y_test) > 0.9
    # the reported held-out score is the result graph's (the report does not flatter)
    held = step.summary["held-out accuracy after"]
    assert 0.9 < held <= 1.0 and step.summary["held-out accuracy before"] == 1.0


class SmallCnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.b1(self.c1(x))), 2)
        x = torch.max_pool2d(torch.relu(self.b2(self.c2(x))), 2)
        return self.fc(torch.flatten(x, 1))


def test_asnet_rebuilds_a_tail_with_batch_norm_pools_and_flatten():
    model = SmallCnn().eval()
    with torch.no_grad():
        for bn in (model.b1, model.b2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    x = np.random.default_rng(2).normal(size=(600, 1, 16, 16)).astype(np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    graph = tf.capture(model, torch.zeros(1, 1, 16, 16))
    result, report = tf.compress(graph, "asnet(layer=c1, rank=6, hidden=0, epochs=5)", train_data=(x, y))
    (record,) = report.passes[-1].records
    assert record.details["replaced layers"] == ["c2", "b2", "fc"]  # the tail was read and checked on data
    kinds = [l.kind for l in result.layers()]
    assert kinds == ["conv", "batchnorm", "linear", "linear"]
    out = result.run({result.inputs[0].name: x[:8]})[result.output_names[0]]
    assert out.shape == (8, 3)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.c(torch.relu(self.b(h)) + h)


def test_asnet_refusals_name_the_problem():
    graph = tf.capture(Residual().eval(), torch.zeros(1, 6))
    x = np.random.default_rng(0).normal(size=(64, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    with pytest.raises(PipelineError, match="after 'a' the network is not a chain"):
        tf.compress(graph, "asnet(layer=a, rank=2)", train_data=(x, y))
    with pytest.raises(PipelineError, match="no conv / Linear layer 'nope'; its layers: a, b, c"):
        tf.compress(graph, "asnet(layer=nope, rank=2)", train_data=(x, y))
    with pytest.raises(PipelineError, match="asnet needs labelled training data"):
        tf.compress(graph, "asnet(layer=b, rank=2)")
    with pytest.raises(PipelineError, match="give rank= or energy=, not both"):
        tf.compress(graph, "asnet(layer=b, rank=2, energy=0.9)", train_data=(x, y))
    planted = tf.capture(Planted().eval(), torch.zeros(1, 12))
    xp, yp = _labelled(Planted().eval(), 200)
    with pytest.raises(PipelineError, match="rank=60 must lie in 1..48"):
        tf.compress(planted, "asnet(layer=fc1, rank=60)", train_data=(xp, yp))
