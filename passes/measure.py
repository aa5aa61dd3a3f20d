"""How much a rewrite changed the numbers: relative errors of layers and of whole graphs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from tensorfold.ir.graph import Graph, Layer
from tensorfold.ir.specs import Spec
from tensorfold.ir.torch_modules import run_specs

Feeds = list[dict[str, np.ndarray]]


def relative_error(reference: np.ndarray, value: np.ndarray) -> float:
    """||reference - value|| / ||reference|| (Frobenius), in float64."""
    reference = np.asarray(reference, np.float64)
    diff = np.linalg.norm(reference - np.asarray(value, np.float64))
    norm = np.linalg.norm(reference)
    return float(diff / norm) if norm > 0 else float(diff)


def _pooled_error(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
    """One relative error over several output tensors, pooled (not averaged)."""
    num = sum(float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)) for a, b in pairs)
    den = sum(float(np.sum(np.asarray(a, np.float64) ** 2)) for a, _ in pairs)
    return float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num))


def output_error(before: Graph, after: Graph, feeds: Feeds) -> float | None:
    """Relative error of `after`'s outputs against `before`'s, pooled over all feeds and outputs."""
    if not feeds:
        return None
    pairs = []
    for feed in feeds:
        reference, value = before.run(feed), after.run(feed)
        pairs += [(reference[n], value[m]) for n, m in zip(before.output_names, after.output_names)]
    return _pooled_error(pairs)


ERROR_SAMPLES = 128  # calibration samples the reported errors are measured on (passes still fit on all)


@dataclass
class ErrorInputs:
    """The inputs errors are measured on: random feeds always, calibration feeds when given.

    Errors use the first ERROR_SAMPLES calibration samples: a layer's error records its input by
    running the graph, once per layer, so on all of a 512-image calibration set a ResNet-18 spent
    minutes reporting errors. Data-driven passes read all of `calibration`.
    """

    random: Feeds
    calibration: Feeds = field(default_factory=list)

    @property
    def calibration_for_errors(self) -> Feeds:
        kept, count = [], 0
        for feed in self.calibration:
            if count >= ERROR_SAMPLES:
                break
            kept.append(feed)
            count += len(next(iter(feed.values()))) if feed else 0
        return kept

    @classmethod
    def for_graph(cls, graph: Graph, calibration: Feeds | None = None, count: int = 2) -> "ErrorInputs":
        return cls([graph.random_inputs(seed) for seed in range(count)], list(calibration or []))


def layer_error(graph: Graph, chain: Sequence[Layer], new_specs: Sequence[Spec], inputs: ErrorInputs,
                new_input: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[float | None, float | None]:
    """Error of `new_specs` against the chain it replaces, each fed the chain's real input.

    The chain's input is recorded in `graph` (the graph as it is just before the
    replacement), so the figure isolates this rewrite from every other one. `new_input`
    transforms what the new specs see (int8: the input as its quantized values).
    """
    old_specs = [layer.spec for layer in chain]
    tensor = chain[0].input

    def measure(feeds: Feeds) -> float | None:
        if not feeds:
            return None
        pairs = []
        for feed in feeds:
            x = _record(graph, feed, tensor)
            if chain[0].facts.get("transA"):  # an ONNX Gemm that reads its input transposed
                x = x.T
            pairs.append((run_specs(old_specs, x), run_specs(new_specs, new_input(x) if new_input else x)))
        return _pooled_error(pairs)

    return measure(inputs.random), measure(inputs.calibration_for_errors)


def _record(graph: Graph, feed: Mapping[str, np.ndarray], tensor: str) -> np.ndarray:
    if tensor in feed:
        return feed[tensor]
    return graph.run(feed, record=[tensor])[tensor]
