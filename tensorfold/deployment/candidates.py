"""Candidate replacements per layer: tucker2 for kxk convs, svd for 1x1 convs and Linear, at the ranks
of the ratio policy (docs/methods.md#ratio) at a ladder of rates; and each candidate's error.

Duplicate ranks and ranks that do not reduce the layer's FLOPs are skipped. The error of a
candidate is its relative output error against the layer on calibration data (the layer's real
input, recorded once per layer), else its weight error.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tensorfold.ir.graph import Graph, Layer
from tensorfold.ir.specs import Spec, chain_cost, cost
from tensorfold.ir.torch_modules import run_specs
from tensorfold.passes import decompose as dec
from tensorfold.passes.ranks import policy as rp
from tensorfold.passes.equivalent import weight_error
from tensorfold.passes.substitute.factorize import METHODS as FACTORIZATIONS

RATES = (1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
ERROR_SAMPLES = 32       # calibration samples the candidates' errors are measured on
DECOMPOSE = {"n_iter_max": 3, "tol": 1e-6}  # tucker2's pass defaults (HOOI sweeps)


@dataclass
class Candidate:
    method: str                       # "original", "tucker2" or "svd"
    ranks: tuple[int, ...]
    specs: list[Spec]
    flops: int
    params: int
    error: float = 0.0
    latency_ms: float | None = None
    iqr_ms: float | None = None
    cached: bool = False
    emulated: bool = False            # timed under qemu: not a device time
    noisy: bool = False               # its samples scattered even after retries: used, not cached

    @property
    def key(self) -> str:
        return "original" if self.method == "original" else f"{self.method}({','.join(map(str, self.ranks))})"


@dataclass
class LayerCandidates:
    layer: str
    kind: str
    in_shape: tuple[int, ...]
    facts: dict
    candidates: list[Candidate] = field(default_factory=list)  # [0] is the original

    @property
    def original(self) -> Candidate:
        return self.candidates[0]


def method_for(layer: Layer) -> str | None:
    """tucker2 for a kxk conv (k > 1), svd for a 1x1 conv or a Linear, None when neither applies."""
    if layer.spec is None or layer.unusable or layer.kind not in ("conv", "linear"):
        return None
    kernel = getattr(layer.spec, "kernel_size", None)
    method = "tucker2" if kernel is not None and int(np.prod(kernel)) > 1 else "svd"
    return method if rp.METHODS[method].check(layer.spec) is None else None


def batch_one(shape) -> tuple[int, ...]:
    return (1, *tuple(int(d) for d in shape[1:]))


def ladder(layer: Layer, rates=RATES) -> LayerCandidates | None:
    """The original and its replacements at the ratio policy's ranks (factor weights computed)."""
    method = method_for(layer)
    if method is None:
        return None
    shape = batch_one(layer.in_shape)
    before = cost(layer.spec, shape)
    group = LayerCandidates(layer.name, layer.kind, shape, dict(layer.facts),
                            [Candidate("original", (), [layer.spec], before.flops, before.params)])
    seen = set()
    for rate in rates:
        try:
            ranks = rp.select_ranks(rp.Ratio(rate), method, layer.spec).ranks
        except dec.NotFactorable:
            return None
        if ranks in seen:
            continue
        seen.add(ranks)
        layout_cost = chain_cost(rp.METHODS[method].layout(layer.spec, ranks), shape)
        if layout_cost.flops >= before.flops:
            continue
        try:
            specs = FACTORIZATIONS[method].realise(layer.spec, ranks, DECOMPOSE)
        except dec.NotFactorable:
            continue
        after = chain_cost(specs, shape)
        group.candidates.append(Candidate(method, tuple(int(r) for r in ranks), specs, after.flops, after.params))
    return group if len(group.candidates) > 1 else None


def layer_groups(graph: Graph, rates=RATES) -> list[LayerCandidates]:
    # One BLAS thread for the decompositions: on this shared 2-core machine OpenBLAS with 2 threads
    # spun against the neighbours' load and took 7.2 s for an SVD of a 256 x 2304 matrix that one
    # thread does in 0.39 s (a ResNet-18 ladder: many such SVDs).
    from threadpoolctl import threadpool_limits

    groups = []
    with threadpool_limits(limits=1, user_api="blas"):
        for layer in graph.layers():
            group = ladder(layer, rates)
            if group is not None:
                groups.append(group)
    return groups


def add_errors(graph: Graph, groups: list[LayerCandidates], calibration: list[dict] | None) -> str:
    """Fill every candidate's error; returns how it was measured."""
    inputs = _recorded_inputs(graph, groups, calibration) if calibration else None
    for group in groups:
        layer = graph.layer(group.layer)
        for candidate in group.candidates[1:]:
            if inputs is None:
                candidate.error = float(weight_error(layer.spec, candidate.specs))
            else:
                x = inputs[layer.input]
                x = x.T if group.facts.get("transA") else x
                reference, value = run_specs([layer.spec], x), run_specs(candidate.specs, x)
                candidate.error = _relative(reference, value)
    if inputs is None:
        return "weight error ||W - W'|| / ||W|| (no calibration data)"
    count = len(next(iter(inputs.values()))) if inputs else 0
    return f"relative output error of the layer on {count} calibration samples (its real input)"


def _recorded_inputs(graph: Graph, groups: list[LayerCandidates], calibration: list[dict]) -> dict[str, np.ndarray]:
    tensors = sorted({graph.layer(g.layer).input for g in groups})
    names = [i.name for i in graph.inputs]
    kept, count = [], 0
    for feed in calibration:
        if count >= ERROR_SAMPLES:
            break
        n = len(next(iter(feed.values())))
        take = min(n, ERROR_SAMPLES - count)
        kept.append({k: v[:take] for k, v in feed.items()})
        count += take
    recorded: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    for feed in kept:
        values = graph.run(feed, record=[t for t in tensors if t not in names])
        for t in tensors:
            recorded[t].append(feed[t] if t in feed else values[t])
    return {t: np.concatenate(v) for t, v in recorded.items()}


def _relative(reference: np.ndarray, value: np.ndarray) -> float:
    reference = np.asarray(reference, np.float64)
    norm = np.linalg.norm(reference)
    diff = np.linalg.norm(reference - np.asarray(value, np.float64))
    return float(diff / norm) if norm > 0 else float(diff)
