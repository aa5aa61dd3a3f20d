"""A graph as a torch module to train, and back: FX graphs train their own GraphModule; ONNX
graphs train onnx2torch's conversion, whose values go back into the same initializers
(ir/onnx_torch.py). Training changes values only: every layer keeps its kind and shape, so a
factorized layer stays factorized at the same ranks."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable

from torch import fx, nn

from tensorfold.ir.errors import PipelineError
from tensorfold.ir.fx_graph import FxGraph
from tensorfold.ir.graph import Graph
from tensorfold.ir.onnx_graph import OnnxGraph

_QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"}


@dataclass
class Trainable:
    module: nn.Module
    layer_parameters: Callable[[str], list[nn.Parameter]]  # glob on layer names -> their parameters
    finish: Callable[[], Graph]                             # the graph holding the module's current values
    notes: list[str] = field(default_factory=list)          # weights that cannot train, and why

    def parameters(self, frozen_layers: list[str]) -> list[nn.Parameter]:
        """The parameters to train: all but those of the named layers (and of weights that cannot train)."""
        frozen = {id(p) for name in frozen_layers for p in self.layer_parameters(name)}
        return [p for p in self.module.parameters() if id(p) not in frozen and p.requires_grad]


def trainable(graph: Graph, label: str = "finetune") -> Trainable:
    refuse_unsupported(graph, label)
    if isinstance(graph, FxGraph):
        return _fx(graph)
    if isinstance(graph, OnnxGraph):
        return _onnx(graph)
    raise PipelineError(f"{label}: cannot train a {type(graph).__name__}")


def refuse_unsupported(graph: Graph, label: str) -> None:
    """Quantized or codebook graphs hold values training would invalidate: name the fix."""
    if getattr(graph, "coding", None) is not None:
        raise PipelineError(f"{label}: {graph.source} is already k-means coded; training would move the weights off "
                            "the codebook. Put finetune before kmeans in the pipeline.")
    if isinstance(graph, OnnxGraph):
        quantized = sorted({n.op_type for n in graph.model.graph.node} & _QUANTIZED_OPS)
        if quantized:
            raise PipelineError(f"{label}: {graph.source} is quantized ({', '.join(quantized)}); tensorfold does not "
                                "train quantized graphs. Put finetune before int8 in the pipeline.")


def _fx(graph: FxGraph) -> Trainable:
    copy = graph.copy()
    gm = copy.gm

    def layer_parameters(pattern: str) -> list[nn.Parameter]:
        found = []
        for layer in copy.layers():
            if not fnmatch.fnmatchcase(layer.name, pattern):
                continue
            node = copy._node(layer.facts["node"])
            if node.op == "call_module":
                found += list(gm.get_submodule(node.target).parameters())
            else:
                for arg in list(node.args) + list(node.kwargs.values()):
                    if isinstance(arg, fx.Node) and arg.op == "get_attr":
                        value = copy._attr(arg.target)
                        if isinstance(value, nn.Parameter):
                            found.append(value)
        return found

    def finish() -> FxGraph:
        return FxGraph(gm, copy.example_inputs, copy.source, copy.training)

    notes = [f"{name}: a buffer, not a parameter (stays fixed)" for name, b in gm.named_buffers()
             if b.is_floating_point() and not name.endswith(("running_mean", "running_var"))][:20]
    return Trainable(gm, layer_parameters, finish, notes)


def _onnx(graph: OnnxGraph) -> Trainable:
    from tensorfold.ir.onnx_torch import torch_view

    view = torch_view(graph)
    mapped = {id(p) for p in view.tensors.values()}
    for name, parameter in view.module.named_parameters():
        if id(parameter) not in mapped:  # no initializer to write it back to: training it would be lost
            parameter.requires_grad_(False)
            view.untrainable.setdefault(name, "no initializer holds it")
    notes = [f"{name}: {why} (stays fixed)" for name, why in view.untrainable.items()]
    return Trainable(view.module, view.parameters_of, view.written_back, notes)
