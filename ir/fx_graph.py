"""The torch.fx adapter of the graph view.

A layer is either a `call_module` of a standard torch layer (what `symbolic_trace`
gives) or a `call_function` of the aten op with constant `get_attr` weights (what
`torch.export(...).module()` gives when fx cannot trace). Replacements are inserted
as `call_module` nodes of the modules `ir.torch_modules` builds from specs.
The GraphModule is always kept in eval mode; `training` remembers how it arrived.
"""
from __future__ import annotations

import copy
import io
import operator
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, _extract_tensor_metadata

from .errors import CaptureError, ExportError, InputShapeError
from .graph import GRAPH_OUTPUT, Graph, Layer, TensorInfo
from .specs import BatchNorm, Conv, ConvTranspose, Linear, Spec
from .torch_modules import ChannelSelect, ParallelSumModule, chain_module

aten = torch.ops.aten
_CONV_MODULES = (nn.Conv1d, nn.Conv2d)
_CONV_T_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d)
_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d)
_CONV_FUNCTIONS = {aten.conv1d.default, aten.conv2d.default, torch.nn.functional.conv1d,
                   torch.nn.functional.conv2d, torch.conv1d, torch.conv2d}
_LINEAR_FUNCTIONS = {aten.linear.default, torch.nn.functional.linear}
_BN_FUNCTIONS = {aten.batch_norm.default, torch.nn.functional.batch_norm}
_ONNX_OP_NAMES = {"relu": "Relu"}  # torch spellings (nn.ReLU, F.relu, torch.relu_, aten.relu) -> ONNX's


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().numpy().copy()


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else (int(v),) * n


def conv_padding(padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """Torch padding (ints, 'valid' or 'same') as per-dim (begin, end) pairs."""
    if padding == "valid":
        return tuple((0, 0) for _ in kernel)
    if padding == "same":
        # torch puts the odd extra pixel at the end
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return tuple((t // 2, t - t // 2) for t in totals)
    return tuple((p, p) for p in _tuple(padding, len(kernel)))


def _conv_spec(weight, bias, stride, padding, dilation, groups) -> Conv:
    n = weight.ndim - 2
    kernel = tuple(weight.shape[2:])
    dilation = _tuple(dilation, n)
    return Conv(_np(weight), _np(bias), _tuple(stride, n), conv_padding(padding, kernel, dilation), dilation, int(groups))


class FxGraph(Graph):
    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], source: str, training: bool = False):
        self.gm = _eval_mode(gm)
        self.example_inputs = tuple(example_inputs)
        self.source = source
        self.training = training
        self._layers: list[Layer] | None = None
        self._propagate_shapes()

    # ---- reading ---------------------------------------------------------------------
    @property
    def placeholders(self) -> list[fx.Node]:
        return [n for n in self.gm.graph.nodes if n.op == "placeholder"]

    @property
    def inputs(self) -> list[TensorInfo]:
        return [TensorInfo(n.name, tuple(x.shape), str(x.dtype).replace("torch.", ""))
                for n, x in zip(self.placeholders, self.example_inputs)]

    @property
    def output_names(self) -> list[str]:
        return [f"output{i}" for i in range(len(self._output_nodes()))]

    def _output_nodes(self) -> list[Any]:
        out = next(n for n in self.gm.graph.nodes if n.op == "output")
        return list(torch.utils._pytree.tree_leaves(out.args[0]))

    def layers(self) -> list[Layer]:
        if self._layers is None:
            calls: dict[str, int] = {}
            for node in self.gm.graph.nodes:
                if node.op == "call_module":
                    calls[node.target] = calls.get(node.target, 0) + 1
            self._layers = [layer for node in self.gm.graph.nodes
                            if (layer := self._read_layer(node, calls)) is not None]
        return self._layers

    def _shape(self, node: Any) -> tuple[int, ...]:
        meta = getattr(node, "meta", {}).get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else ()

    def _read_layer(self, node: fx.Node, calls: dict[str, int]) -> Layer | None:
        kind, spec, unusable, output = None, None, None, node
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            kind, spec, unusable = self._read_module(module)
            if kind and calls[node.target] > 1:
                unusable = f"module {node.target!r} is called at {calls[node.target]} places (shared weights)"
        elif node.op == "call_function":
            kind, spec, unusable = self._read_function(node)
        if kind is None:
            return None
        if not node.args or not isinstance(node.args[0], fx.Node):
            return None
        name = node.target if node.op == "call_module" else node.name
        return Layer(name, kind, spec, node.args[0].name, output.name, self._shape(node.args[0]),
                     self._shape(output), unusable, {"node": node.name})

    @staticmethod
    def _read_module(module: nn.Module) -> tuple[str | None, Spec | None, str | None]:
        if isinstance(module, _CONV_MODULES):
            spec = _conv_spec(module.weight, module.bias, module.stride, module.padding, module.dilation, module.groups)
            if module.padding_mode != "zeros":
                return "conv", spec, f"padding_mode={module.padding_mode!r} is not zero padding"
            return "conv", spec, None
        if isinstance(module, _CONV_T_MODULES):
            n = module.weight.ndim - 2
            spec = ConvTranspose(_np(module.weight), _np(module.bias), _tuple(module.stride, n),
                                 _tuple(module.padding, n), _tuple(module.output_padding, n),
                                 _tuple(module.dilation, n), module.groups)
            return "conv_transpose", spec, None
        if isinstance(module, nn.Linear):
            return "linear", Linear(_np(module.weight), _np(module.bias)), None
        if isinstance(module, _BN_MODULES):
            if module.running_mean is None:
                return "batchnorm", None, "uses batch statistics (track_running_stats=False)"
            c = module.num_features
            gamma = _np(module.weight) if module.affine else np.ones(c, np.float32)
            beta = _np(module.bias) if module.affine else np.zeros(c, np.float32)
            return "batchnorm", BatchNorm(_np(module.running_mean), _np(module.running_var), gamma, beta, module.eps), None
        return None, None, None

    def _constant(self, arg: Any) -> torch.Tensor | None:
        if arg is None:
            return None
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            return self._attr(arg.target)
        raise ValueError("not a constant")

    def _attr(self, target: str) -> torch.Tensor:
        owner, _, attr = target.rpartition(".")
        return getattr(self.gm.get_submodule(owner) if owner else self.gm, attr)

    def _read_function(self, node: fx.Node) -> tuple[str | None, Spec | None, str | None]:
        args = list(node.args)
        try:
            if node.target in _CONV_FUNCTIONS:
                weight = self._constant(args[1])
                rest = args[2:] + [None] * (5 - len(args[2:]))
                kw = node.kwargs
                bias = self._constant(kw.get("bias", rest[0]))
                n = weight.ndim - 2
                stride = kw.get("stride", rest[1] if rest[1] is not None else 1)
                padding = kw.get("padding", rest[2] if rest[2] is not None else 0)
                dilation = kw.get("dilation", rest[3] if rest[3] is not None else 1)
                groups = kw.get("groups", rest[4] if rest[4] is not None else 1)
                return "conv", _conv_spec(weight, bias, _tuple(stride, n), padding, dilation, groups), None
            if node.target in _LINEAR_FUNCTIONS:
                weight = self._constant(args[1])
                bias = self._constant(node.kwargs.get("bias", args[2] if len(args) > 2 else None))
                return "linear", Linear(_np(weight), _np(bias)), None
            if node.target in _BN_FUNCTIONS:
                if node.target is aten.batch_norm.default:
                    _, gamma, beta, mean, var, training, _, eps = args[:8]
                else:
                    _, mean, var = args[:3]
                    gamma, beta = node.kwargs.get("weight"), node.kwargs.get("bias")
                    training, eps = node.kwargs.get("training", False), node.kwargs.get("eps", 1e-5)
                if training:
                    return "batchnorm", None, "runs in training mode (batch statistics)"
                try:
                    mean_t, var_t = self._constant(mean), self._constant(var)
                except ValueError:
                    return "batchnorm", None, "its statistics are graph inputs, not constants"
                c = mean_t.shape[0]
                g = _np(self._constant(gamma)) if gamma is not None else np.ones(c, np.float32)
                b = _np(self._constant(beta)) if beta is not None else np.zeros(c, np.float32)
                return "batchnorm", BatchNorm(_np(mean_t), _np(var_t), g, b, float(eps)), None
        except ValueError:
            kind = "conv" if node.target in _CONV_FUNCTIONS else "linear" if node.target in _LINEAR_FUNCTIONS else None
            return (kind, None, "its weight is not a constant") if kind else (None, None, None)
        return None, None, None

    def consumers(self, tensor: str) -> list[str]:
        node = self._node(tensor)
        return [GRAPH_OUTPUT if user.op == "output" else user.name for user in node.users]

    def consumer_ops(self, tensor: str) -> list[str]:
        return [GRAPH_OUTPUT if user.op == "output" else self._op_name(user) for user in self._node(tensor).users]

    def consumer_outputs(self, tensor: str) -> list[tuple[str, str]]:
        return [(GRAPH_OUTPUT, "") if user.op == "output" else (self._op_name(user), user.name)
                for user in self._node(tensor).users]

    def _op_name(self, node: fx.Node) -> str:
        if node.op == "call_module":
            name = type(self.gm.get_submodule(node.target)).__name__
        else:
            name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        return _ONNX_OP_NAMES.get(name.lower().rstrip("_"), name)

    def unknown_ops(self) -> list[tuple[str, str]]:
        return []  # every torch op runs as it is; fx has no op the adapter must understand

    def total_params(self) -> int:
        seen: set[int] = set()
        total = 0
        for node in self.gm.graph.nodes:
            tensors = []
            if node.op == "call_module":
                module = self.gm.get_submodule(node.target)
                tensors = list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]
            elif node.op == "get_attr":
                value = self._attr(node.target)
                tensors = [value] if isinstance(value, torch.Tensor) and value.is_floating_point() else []
            for t in tensors:
                if id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel()
        return total

    def _node(self, name: str) -> fx.Node:
        for node in self.gm.graph.nodes:
            if node.name == name:
                return node
        raise KeyError(f"{self.source}: no node named {name!r}")

    # ---- editing ---------------------------------------------------------------------------
    def copy(self) -> "FxGraph":
        clone = FxGraph(copy.deepcopy(self.gm), self.example_inputs, self.source, self.training)
        clone.coding = self.coding  # immutable: shared, not copied
        return clone

    def eval(self) -> "FxGraph":
        graph = self.copy()
        graph.training = False
        return graph

    def replace(self, layer_names: Sequence[str], specs: Sequence[Spec]) -> None:
        chain = [self.layer(n) for n in layer_names]
        nodes = [self._node(layer.facts["node"]) for layer in chain]
        first, last = nodes[0], self._node(chain[-1].output)
        target = first.target if first.op == "call_module" else self._free_name(f"tf_{first.name}")
        module = chain_module(specs)
        self.gm.graph.owning_module = self.gm
        _set_submodule(self.gm, target, module)
        inserted: list[fx.Node] = []
        with self.gm.graph.inserting_before(first):
            new = self._insert(module, target, first.args[0], inserted)
        replaced_shape = self._shape(last)
        last.replace_all_uses_with(new)
        for node in reversed(nodes):
            if not node.users:
                self.gm.graph.erase_node(node)
        self.gm.graph.eliminate_dead_code()
        self.gm.delete_all_unused_submodules()
        self._drop_unused_attributes()
        self.gm.recompile()
        self._layers = None
        if not self._propagate_inserted(inserted, replaced_shape):
            self._propagate_shapes()

    def _insert(self, module: nn.Module, target: str, source: fx.Node, inserted: list[fx.Node]) -> fx.Node:
        """One node per leaf module, so each new layer is listed by layers() for the next pass; a
        ParallelSumModule becomes its branches' nodes (a ChannelSelect leaf where a branch gathers) and adds."""
        if isinstance(module, nn.Sequential):
            for name, child in module.named_children():
                source = self._insert(child, f"{target}.{name}", source, inserted)
            return source
        if isinstance(module, ParallelSumModule):
            total = None
            for i, (select, branch) in enumerate(zip(module.selects, module.branches)):
                value = source
                if isinstance(select, ChannelSelect):
                    value = self._insert(select, f"{target}.selects.{i}", value, inserted)
                value = self._insert(branch, f"{target}.branches.{i}", value, inserted)
                if total is not None:
                    value = self.gm.graph.call_function(operator.add, args=(total, value))
                    inserted.append(value)
                total = value
            return total
        inserted.append(self.gm.graph.call_module(target, args=(source,)))
        return inserted[-1]

    def _propagate_inserted(self, inserted: list[fx.Node], replaced_shape: tuple[int, ...]) -> bool:
        """Shapes of the inserted nodes only (a whole-graph run per replacement made folding quadratic).

        Every other shape stands if the chain's output keeps its shape; False if it does not.
        """
        values: dict[fx.Node, torch.Tensor] = {}
        for node in inserted:
            for arg in node.args:
                if isinstance(arg, fx.Node) and arg not in values and arg not in inserted:
                    meta = arg.meta.get("tensor_meta")
                    if meta is None:
                        return False
                    values[arg] = torch.zeros(tuple(meta.shape), dtype=meta.dtype)
        if not replaced_shape:
            return False
        with torch.no_grad():
            for node in inserted:
                args = [values[a] if isinstance(a, fx.Node) else a for a in node.args]
                fn = self.gm.get_submodule(node.target) if node.op == "call_module" else node.target
                values[node] = fn(*args)
                node.meta["tensor_meta"] = _extract_tensor_metadata(values[node])
        return tuple(values[inserted[-1]].shape) == tuple(replaced_shape)

    def _free_name(self, base: str) -> str:
        base = base.replace(".", "_")
        name, i = base, 1
        while hasattr(self.gm, name):
            name, i = f"{base}_{i}", i + 1
        return name

    def _drop_unused_attributes(self) -> None:
        """Drop constants that no get_attr reads any more (torch.export graphs hold weights as attributes)."""
        used = {n.target for n in self.gm.graph.nodes if n.op in ("get_attr", "call_module")}
        for name, _ in list(self.gm.named_parameters(recurse=False)) + list(self.gm.named_buffers(recurse=False)):
            if name not in used:
                delattr(self.gm, name)

    # ---- running and export -----------------------------------------------------------------
    def _propagate_shapes(self) -> None:
        with torch.no_grad():
            ShapeProp(self.gm).propagate(*self.example_inputs)

    def run(self, inputs: Mapping[str, np.ndarray], record: Sequence[str] = ()) -> dict[str, np.ndarray]:
        self.check_inputs(inputs)
        args = [torch.from_numpy(np.ascontiguousarray(inputs[n.name])) for n in self.placeholders]
        wanted, recorded = set(record), {}

        class Recorder(fx.Interpreter):
            def run_node(self, n):
                value = super().run_node(n)
                if n.name in wanted:
                    recorded[n.name] = value.detach().numpy().copy()
                return value

        with torch.no_grad():
            result = Recorder(self.gm).run(*args)
        leaves = torch.utils._pytree.tree_leaves(result)
        outputs = {name: t.detach().numpy() for name, t in zip(self.output_names, leaves)}
        return {**outputs, **recorded}

    def to_torch(self) -> fx.GraphModule:
        return self.gm

    def to_exported_program(self) -> torch.export.ExportedProgram:
        try:
            return torch.export.export(self.gm, self.example_inputs)
        except Exception as e:  # noqa: BLE001 - re-raised with the graph named
            raise ExportError(f"{self.source}: torch.export of the captured graph failed: {e}") from e

    def to_onnx(self) -> onnx.ModelProto:
        """The graph as ONNX, in memory, every weight as it is: no constant folding (it would fuse a batch
        norm into the conv before it, so the conv's k-means-coded weights would no longer be found)."""
        names = [info.name for info in self.inputs]
        buffer = io.BytesIO()
        try:
            torch.onnx.export(self.gm, self.example_inputs, buffer, input_names=names,
                              output_names=self.output_names, dynamo=False, opset_version=17,
                              do_constant_folding=False,
                              dynamic_axes={n: {0: "batch"} for n in names + self.output_names})
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"{self.source}: exporting the graph to ONNX failed: {e}") from e
        return onnx.load_from_string(buffer.getvalue())

    def save(self, path: str) -> None:
        path = os.fspath(path)
        ext = os.path.splitext(path)[1].lower()
        try:
            if ext == ".onnx":
                names = [info.name for info in self.inputs]
                torch.onnx.export(self.gm, self.example_inputs, path, input_names=names,
                                  output_names=self.output_names, dynamo=False, opset_version=17,
                                  dynamic_axes={n: {0: "batch"} for n in names + self.output_names})
            elif ext == ".pt2":
                torch.export.save(self.to_exported_program(), path)
            elif ext == ".pt":
                torch.save(self.gm, path)
            elif ext == ".tfz":
                from .tfz import save_tfz
                save_tfz(self, path)
            else:
                raise ExportError(f"cannot write {path!r}: a torch graph saves as .onnx, .pt2, .pt or .tfz")
        except ExportError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"{self.source}: writing {path!r} failed: {e}") from e


def _eval_mode(gm: fx.GraphModule) -> fx.GraphModule:
    try:
        return gm.eval()
    except NotImplementedError:  # a torch.export module refuses eval(); it was exported from an eval-mode copy
        return gm


def _set_submodule(gm: nn.Module, target: str, module: nn.Module) -> None:
    owner, _, attr = target.rpartition(".")
    setattr(gm.get_submodule(owner) if owner else gm, attr, module)


def capture(model: nn.Module, example_inputs: Any, source: str | None = None) -> FxGraph:
    """torch.nn.Module -> FxGraph: torch.fx first, torch.export where fx cannot trace."""
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture expects a torch.nn.Module, got {type(model).__name__}")
    source = source or type(model).__name__
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not all(isinstance(x, torch.Tensor) for x in inputs):
        raise CaptureError(f"{source}: example inputs must be torch tensors")
    training = model.training
    model = copy.deepcopy(model).eval()  # never touch the user's module
    errors = []
    shapes = [tuple(x.shape) for x in inputs]
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - try the next capture path
        gm = None
        errors.append(f"torch.fx: {type(e).__name__}: {_first_line(e)}")
    if gm is not None:
        try:
            with torch.no_grad():
                gm(*inputs)
        except Exception as e:  # noqa: BLE001
            if _SHAPE_COMPLAINT.search(str(e)):
                raise InputShapeError(
                    f"{source}: running the model on example inputs of shape {shapes} failed: "
                    f"{type(e).__name__}: {_first_line(e)}. Check the input shape (--input-shape).") from e
            raise CaptureError(f"{source}: the model's forward failed on example inputs of shape {shapes}: "
                               f"{type(e).__name__}: {_first_line(e)}") from e
        return FxGraph(gm, inputs, source, training)
    try:
        gm = torch.export.export(model, inputs).module()
        return FxGraph(gm, inputs, source, training)
    except Exception as e:  # noqa: BLE001
        errors.append(f"torch.export: {type(e).__name__}: {_first_line(e)}")
    raise CaptureError(
        f"cannot capture module {source!r}: torch.fx could not trace it and torch.export could not export it "
        f"with inputs of shape {shapes}. " + " | ".join(errors) +
        ". Make the forward free of data-dependent Python control flow, or export it to ONNX yourself.")


# what torch says when a tensor does not fit a layer (conv channels, linear sizes, ranks)
_SHAPE_COMPLAINT = re.compile(r"shape|size|channel|dimension|expected input|mat1 and mat2|must match", re.IGNORECASE)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""
