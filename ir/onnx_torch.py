"""An ONNX graph as a trainable torch module (onnx2torch), and its trained weights written back.

Fine-tuning an ONNX graph trains the torch module onnx2torch converts it to; the trained values
then go back into the *same* initializers, so the graph keeps its nodes, names and opset (no
re-export through torch.onnx). Which initializer each torch tensor holds is found by converting a
second copy in which every layer weight is filled with its own id: exact even where two layers
hold equal values (zero biases), and it survives the transposes the converter applies (Gemm).
Both directions are checked numerically against onnxruntime before anything is trained.
"""
from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from .errors import ExportError
from .onnx_graph import OnnxGraph

# ops whose float initializer inputs are weights a fine-tune may train (not shapes, scales or pads)
_WEIGHT_INPUTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (0, 1),
                  "BatchNormalization": (1, 2), "Add": (0, 1), "Mul": (0, 1), "Sub": (0, 1)}
# ids stay exact in float32 up to 2**24
_MAX_IDS = 2 ** 24
TOLERANCE = 1e-4


@dataclass
class TorchView:
    """`module` computes the graph; `tensors[name]` is the parameter holding initializer `name`
    (`transposed[name]`: as its transpose). Layer weights the conversion did not keep as one
    tensor are listed in `untrainable`, with why."""

    graph: OnnxGraph
    module: nn.Module
    tensors: dict[str, nn.Parameter] = field(default_factory=dict)
    transposed: set[str] = field(default_factory=set)
    untrainable: dict[str, str] = field(default_factory=dict)

    def parameters_of(self, layer_pattern: str) -> list[nn.Parameter]:
        """Parameters of the graph layers whose names match the glob pattern."""
        chosen = []
        nodes = {n.name: n for n in self.graph.model.graph.node}
        for layer in self.graph.layers():
            if not fnmatch.fnmatchcase(layer.name, layer_pattern):
                continue
            for node_name in layer.facts.get("nodes", []):
                node = nodes.get(node_name)
                chosen += [self.tensors[i] for i in (node.input if node is not None else []) if i in self.tensors]
        return chosen

    def written_back(self) -> OnnxGraph:
        """A copy of the graph holding the module's current values, checked against the module."""
        result = self.graph.copy()
        values = {}
        for name, tensor in self.tensors.items():
            array = tensor.detach().cpu().numpy()
            values[name] = np.ascontiguousarray(array.T if name in self.transposed else array)
        for i, init in enumerate(result.model.graph.initializer):
            if init.name in values:
                result.model.graph.initializer[i].CopyFrom(numpy_helper.from_array(
                    values[init.name].astype(numpy_helper.to_array(init).dtype), init.name))
        result._invalidate()
        check_same(result, self.module, "the fine-tuned weights written back into the ONNX graph")
        return result


def torch_view(graph: OnnxGraph) -> TorchView:
    """The graph as a torch module whose layer weights are trainable parameters."""
    try:
        import onnx2torch
    except ImportError as e:  # a dependency; only a broken install lacks it
        raise ExportError(f"{graph.source}: fine-tuning an ONNX graph needs onnx2torch ({e})") from e
    source = graph.copy()
    source.materialize_weights()  # weights held in Constant nodes become initializers, so they can train
    ids = _fingerprinted(source.model)
    try:
        module = onnx2torch.convert(copy.deepcopy(source.model))
        marked = onnx2torch.convert(ids.model)
    except Exception as e:  # noqa: BLE001 - any converter failure means: this graph cannot be fine-tuned
        ops = sorted({n.op_type for n in source.model.graph.node})
        raise ExportError(f"{graph.source}: onnx2torch cannot convert this graph to torch for fine-tuning "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); its ops: "
                          f"{', '.join(ops)}. Fine-tune the torch model before exporting it instead.") from e
    module.eval()
    view = TorchView(source, module)
    marked_tensors = dict(marked.named_parameters()) | dict(marked.named_buffers())
    real_tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    found: dict[str, str] = {}
    for key, tensor in marked_tensors.items():
        values = tensor.detach().flatten()
        if values.numel() == 0 or not torch.is_floating_point(values) or not bool((values == values[0]).all()):
            continue
        name = ids.names.get(float(values[0]))
        if name is None or key not in real_tensors:
            continue
        if name in found:  # one initializer behind two torch tensors: training would split it
            view.untrainable[name] = "held by two torch tensors after conversion"
            continue
        found[name] = key
    initializers = {t.name: numpy_helper.to_array(t) for t in source.model.graph.initializer}
    for name, key in found.items():
        if name in view.untrainable:
            continue
        value, shape = initializers[name], tuple(real_tensors[key].shape)
        if shape == value.shape and not _transposed_gemm_weight(source.model, name):
            pass
        elif value.ndim == 2 and shape == value.shape[::-1]:
            view.transposed.add(name)
        else:
            view.untrainable[name] = f"converted to shape {shape} from {value.shape}"
            continue
        view.tensors[name] = _as_parameter(module, key)
    for name in ids.names.values():
        if name not in view.tensors and name not in view.untrainable:
            view.untrainable[name] = "the converter folded it into another value"
    check_same(source, module, "onnx2torch's conversion")
    return view


def check_same(graph: OnnxGraph, module: nn.Module, what: str) -> None:
    """Raise unless `module` computes what `graph` computes (onnxruntime) on random inputs."""
    feeds = graph.random_inputs(seed=1, batch=2)
    expected = graph.run(feeds)[graph.output_names[0]]
    with torch.no_grad():
        got = module(*[torch.from_numpy(feeds[i.name]) for i in graph.inputs])
    got = (got[0] if isinstance(got, (tuple, list)) else got).detach().numpy()
    error = float(np.linalg.norm(got - expected) / max(np.linalg.norm(expected), 1e-12))
    if not np.isfinite(error) or error > TOLERANCE:
        raise ExportError(f"{graph.source}: {what} does not reproduce the graph (relative output error {error:.2e}, "
                          f"tolerance {TOLERANCE:g}); fine-tuning would train something else")


@dataclass
class _Ids:
    model: onnx.ModelProto
    names: dict[float, str]


def _fingerprinted(model: onnx.ModelProto) -> _Ids:
    """A copy whose trainable initializers are filled with their own id (1, 2, ...)."""
    marked = copy.deepcopy(model)
    weights = set()
    for node in marked.graph.node:
        for index in _WEIGHT_INPUTS.get(node.op_type, ()):
            if index < len(node.input) and node.input[index]:
                weights.add(node.input[index])
    # an initializer that also feeds a shape, pad or scale input keeps its value: only pure weights are marked
    for node in marked.graph.node:
        positions = _WEIGHT_INPUTS.get(node.op_type, ())
        weights -= {name for i, name in enumerate(node.input) if i not in positions}
    names: dict[float, str] = {}
    for i, init in enumerate(marked.graph.initializer):
        value = numpy_helper.to_array(init)
        if init.name not in weights or value.dtype.kind != "f" or value.size < 1 or len(names) + 1 >= _MAX_IDS:
            continue
        mark = float(len(names) + 1)
        names[mark] = init.name
        marked.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.full(value.shape, mark, value.dtype), init.name))
    return _Ids(marked, names)


def _transposed_gemm_weight(model: onnx.ModelProto, name: str) -> bool:
    """A square Gemm B with transB=0: torch's Linear holds its transpose, with the same shape."""
    for node in model.graph.node:
        if node.op_type == "Gemm" and len(node.input) > 1 and node.input[1] == name:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            return not trans_b
    return False


def _as_parameter(module: nn.Module, key: str) -> nn.Parameter:
    """The tensor at `key` as a trainable parameter (onnx2torch keeps some initializers as buffers)."""
    owner_name, _, attr = key.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    tensor = getattr(owner, attr)
    if isinstance(tensor, nn.Parameter):
        return tensor
    parameter = nn.Parameter(tensor.detach().clone())
    delattr(owner, attr)
    owner.register_parameter(attr, parameter)
    return parameter
