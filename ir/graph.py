"""The graph view every pass works through (docs/architecture.md#the-graph-view).

Two adapters implement it: `FxGraph` (torch.fx) and `OnnxGraph` (ONNX, kept as ONNX).
A pass only lists layers, reads their specs, asks who consumes a tensor, replaces a
chain of layers by a chain of specs, and runs the graph; so it is written once.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from .errors import InputShapeError, InvalidModelError
from .specs import Cost, Spec, arrays_of, cost

if TYPE_CHECKING:
    from .coding import WeightCoding


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclass
class Layer:
    """A layer a pass can act on.

    `spec` is None when the layer exists but cannot be read as a spec (for instance a
    batch norm whose statistics are graph inputs); `unusable` then says why.
    """

    name: str
    kind: str                     # "conv", "conv_transpose", "linear", "batchnorm"
    spec: Spec | None
    input: str                    # tensor feeding the layer
    output: str                   # tensor it produces
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    unusable: str | None = None
    facts: dict = field(default_factory=dict)  # adapter facts, e.g. {"op": "Gemm"}

    @property
    def cost(self) -> Cost:
        if self.spec is None:
            return Cost()
        return cost(self.spec, self.in_shape)


GRAPH_OUTPUT = "<graph output>"


class Graph(abc.ABC):
    """A captured model. Passes copy it, then edit the copy (the input is never mutated)."""

    source: str          # where it came from: a file path or a module's class name
    training: bool = False
    coding: "WeightCoding | None" = None  # set by the kmeans pass: how a .tfz file stores the weights; copies keep it

    # ---- reading -------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def inputs(self) -> list[TensorInfo]: ...

    @property
    @abc.abstractmethod
    def output_names(self) -> list[str]: ...

    @abc.abstractmethod
    def layers(self) -> list[Layer]:
        """Layers in topological order."""

    @abc.abstractmethod
    def consumers(self, tensor: str) -> list[str]:
        """Names of the nodes that read `tensor` (GRAPH_OUTPUT if it is a graph output)."""

    @abc.abstractmethod
    def consumer_ops(self, tensor: str) -> list[str]:
        """The op of every node that reads `tensor`, ONNX-spelled ("Relu", "Add", ...; a torch op by its
        own name where ONNX has none), and GRAPH_OUTPUT if it is a graph output."""

    @abc.abstractmethod
    def consumer_outputs(self, tensor: str) -> list[tuple[str, str]]:
        """(op, first output tensor) of every node that reads `tensor`, the op spelled as `consumer_ops`
        spells it; (GRAPH_OUTPUT, "") if it is a graph output. A pass walks a chain of ops with it."""

    @abc.abstractmethod
    def unknown_ops(self) -> list[tuple[str, str]]:
        """(node, op) pairs the adapter does not model; they are kept as they are."""

    @abc.abstractmethod
    def total_params(self) -> int: ...

    # ---- editing (on a copy) -----------------------------------------------------------
    @abc.abstractmethod
    def copy(self) -> "Graph": ...

    @abc.abstractmethod
    def replace(self, layer_names: Sequence[str], specs: Sequence[Spec]) -> None:
        """Replace a chain of layers (each the only consumer of the previous) by `specs`."""

    @abc.abstractmethod
    def eval(self) -> "Graph":
        """A copy in inference mode (batch norm uses running statistics)."""

    # ---- running and export ------------------------------------------------------------
    @abc.abstractmethod
    def run(self, inputs: Mapping[str, np.ndarray], record: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """Outputs by name, plus every tensor named in `record`."""

    @abc.abstractmethod
    def save(self, path: str) -> None: ...

    # ---- shared helpers -------------------------------------------------------------------
    def layer(self, name: str) -> Layer:
        for layer in self.layers():
            if layer.name == name:
                return layer
        raise KeyError(f"{self.source}: no layer named {name!r}")

    def producer(self, tensor: str) -> Layer | None:
        for layer in self.layers():
            if layer.output == tensor:
                return layer
        return None

    def layer_cost(self) -> Cost:
        total = Cost()
        for layer in self.layers():
            total = total + layer.cost
        return total

    def random_inputs(self, seed: int = 0, batch: int | None = None) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        feeds = {}
        for info in self.inputs:
            shape = (batch, *info.shape[1:]) if batch else info.shape
            if info.dtype.startswith("float"):
                feeds[info.name] = rng.standard_normal(shape).astype(info.dtype)
            else:
                feeds[info.name] = rng.integers(0, 2, size=shape).astype(info.dtype)
        return feeds

    def check_inputs(self, inputs: Mapping[str, np.ndarray]) -> None:
        expected = {info.name: info for info in self.inputs}
        missing = sorted(set(expected) - set(inputs))
        extra = sorted(set(inputs) - set(expected))
        if missing or extra:
            raise InputShapeError(
                f"{self.source}: inputs {sorted(inputs)} do not match the graph's inputs {sorted(expected)}"
                f" (missing {missing}, unexpected {extra})")
        for name, value in inputs.items():
            want = expected[name].shape
            got = tuple(np.shape(value))
            if len(got) != len(want) or any(w > 0 and w != g for w, g in zip(want[1:], got[1:])):
                raise InputShapeError(
                    f"{self.source}: input {name!r} has shape {got}, the graph expects {want}"
                    " (the first axis, the batch, may differ)")

    def check_finite(self) -> None:
        """Refuse weights with NaN/Inf: any pass on them would give a silently wrong model."""
        for layer in self.layers():
            if layer.spec is None:
                continue
            for array_name, array in arrays_of(layer.spec).items():
                if not np.all(np.isfinite(array)):
                    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
                    raise InvalidModelError(
                        f"{self.source}: layer {layer.name!r} ({layer.kind}) has {bad} non-finite "
                        f"value(s) (NaN or Inf) in its {array_name}; fix or retrain the model first")
