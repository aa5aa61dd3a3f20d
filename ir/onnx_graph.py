"""The ONNX adapter of the graph view: ONNX in, ONNX out, no round trip through torch.

Layers: Conv / ConvTranspose / Gemm / MatMul(+Add) with constant weights and
BatchNormalization. Edits use `onnx.helper` (small, local edits: remove a chain of
nodes, insert the spec nodes under the same output name, so consumers need no rewiring).
onnxruntime runs the graph and checks every result.
"""
from __future__ import annotations

import copy
import os
from typing import Mapping, Sequence

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort
from onnx import helper, numpy_helper

from .errors import CaptureError, ExportError, InputShapeError, InvalidModelError
from .graph import GRAPH_OUTPUT, Graph, Layer, TensorInfo
from .onnx_nodes import spec_nodes
from .quant_math import dequantize
from .specs import BatchNorm, Conv, ConvTranspose, Linear, Spec

_PARAM_DTYPES = {np.dtype(t) for t in ("float16", "float32", "float64", "int8", "uint8", "int32")}
_LAYER_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization"}


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _dtype_name(elem_type: int) -> str:
    return str(helper.tensor_dtype_to_np_dtype(elem_type))


class OnnxGraph(Graph):
    def __init__(self, model: onnx.ModelProto, source: str, input_shapes: Mapping[str, Sequence[int]] | None = None):
        self.model = model
        self.source = source
        self._name_nodes()
        self._inputs = self._resolve_inputs(input_shapes or {})
        self._invalidate()

    # ---- construction --------------------------------------------------------------
    def _name_nodes(self) -> None:
        taken = {n.name for n in self.model.graph.node if n.name}
        for i, node in enumerate(self.model.graph.node):
            if not node.name:
                name = f"{node.op_type}_{i}"
                while name in taken:
                    name += "_"
                node.name = name
                taken.add(name)

    def _resolve_inputs(self, overrides: Mapping[str, Sequence[int]]) -> list[TensorInfo]:
        initializers = {t.name for t in self.model.graph.initializer}
        infos = []
        for value in self.model.graph.input:
            if value.name in initializers:
                continue
            tensor_type = value.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
            if value.name in overrides:
                given = tuple(int(d) for d in overrides[value.name])
                if len(given) != len(dims) or any(d > 0 and d != g for d, g in zip(dims, given)):
                    raise InputShapeError(
                        f"{self.source}: input {value.name!r} has shape "
                        f"{tuple(d if d > 0 else '?' for d in dims)} in the file; the given shape {given} does not fit it")
                dims = list(given)
            dims = [d if d > 0 else 1 for d in dims]  # unknown (symbolic) dims default to 1
            infos.append(TensorInfo(value.name, tuple(dims), _dtype_name(tensor_type.elem_type)))
        unknown = sorted(set(overrides) - {i.name for i in infos})
        if unknown:
            raise InputShapeError(f"{self.source}: no graph input named {unknown}; inputs are {[i.name for i in infos]}")
        return infos

    def _invalidate(self) -> None:
        self._layers: list[Layer] | None = None
        self._sessions: dict[tuple[str, ...], ort.InferenceSession] = {}
        self._constants = {t.name: t for t in self.model.graph.initializer}
        self._quantized: set[str] = set()
        self._computed: set[str] = set()  # weights that nodes compute (Constant, ConstantOfShape): they count as params
        self._scales = {name for node in self.model.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")
                        for name in node.input[1:]}
        for node in self.model.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self._constants[node.output[0]] = node.attribute[0].t
                self._computed.add(node.output[0])
            elif node.op_type in ("Identity", "Transpose") and node.input[0] in self._constants:
                # exports without constant folding route weights through these (Linear without bias:
                # MatMul(x, Transpose(W)); equal tensors deduplicated behind an Identity)
                value = numpy_helper.to_array(self._constants[node.input[0]])
                if node.op_type == "Transpose":
                    value = np.transpose(value, _attrs(node).get("perm"))
                self._constants[node.output[0]] = numpy_helper.from_array(value, node.output[0])
            elif node.op_type == "ConstantOfShape" and node.input[0] in self._constants:
                # old exporters (the ONNX model zoo's "light" graphs) compute weights this way
                shape = numpy_helper.to_array(self._constants[node.input[0]]).astype(np.int64)
                fill = _attrs(node).get("value")
                fill = numpy_helper.to_array(fill).reshape(-1) if fill is not None else np.zeros(1, np.float32)
                self._constants[node.output[0]] = numpy_helper.from_array(np.full(shape, fill[0], fill.dtype),
                                                                          node.output[0])
                self._computed.add(node.output[0])
            elif node.op_type == "DequantizeLinear" and all(i in self._constants for i in node.input if i):
                # a quantized weight (QDQ): read as its float value, but the layer is marked quantized
                arrays = [numpy_helper.to_array(self._constants[i]) if i else None for i in node.input]
                axis = _attrs(node).get("axis", 1)
                value = dequantize(arrays[0], arrays[1], arrays[2] if len(arrays) > 2 else None, axis)
                self._constants[node.output[0]] = numpy_helper.from_array(value, node.output[0])
                self._quantized.add(node.output[0])
        self._shapes = self._infer_shapes()

    def _infer_shapes(self) -> dict[str, tuple[int, ...]]:
        fixed = copy.deepcopy(self.model)
        del fixed.graph.value_info[:]
        for value in fixed.graph.input:
            info = next((i for i in self._inputs if i.name == value.name), None)
            if info is None:
                continue
            dims = value.type.tensor_type.shape.dim
            for d, size in zip(dims, info.shape):
                d.dim_value = size
        try:
            inferred = onnx.shape_inference.infer_shapes(fixed, strict_mode=False)
        except Exception:  # noqa: BLE001 - fall back to shapes from a run (below)
            inferred = fixed
        shapes = {}
        for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            dims = value.type.tensor_type.shape.dim
            if dims and all(d.HasField("dim_value") for d in dims):
                shapes[value.name] = tuple(d.dim_value for d in dims)
        return shapes

    # ---- reading ----------------------------------------------------------------------
    @property
    def inputs(self) -> list[TensorInfo]:
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.model.graph.output]

    def constant(self, name: str) -> np.ndarray | None:
        tensor = self._constants.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def layers(self) -> list[Layer]:
        if self._layers is None:
            layers = [layer for node in self.model.graph.node if (layer := self._read_layer(node)) is not None]
            missing = {t for layer in layers for t in (layer.input, layer.output) if t not in self._shapes}
            if missing:  # shape inference could not reach them: take the shapes from one run
                recorded = self.run(self.random_inputs(), record=sorted(missing))
                self._shapes.update({t: tuple(recorded[t].shape) for t in missing})
                for layer in layers:
                    layer.in_shape = self._in_shape(layer.input, layer.facts)
                    layer.out_shape = self._shapes[layer.output]
            self._layers = layers
        return self._layers

    def _read_layer(self, node: onnx.NodeProto) -> Layer | None:
        if node.op_type not in _LAYER_OPS or node.domain not in ("", "ai.onnx"):
            return None
        reader = {"Conv": self._read_conv, "ConvTranspose": self._read_conv_transpose, "Gemm": self._read_gemm,
                  "MatMul": self._read_matmul, "BatchNormalization": self._read_bn}[node.op_type]
        read = reader(node)
        if read is None:
            return None
        kind, spec, unusable, facts = read
        if spec is not None and any(name in self._quantized for name in node.input[1:]):
            unusable = "its weights are quantized (int8): quantize after the other passes"
        facts = {"op": node.op_type, "nodes": [node.name], **facts}
        output = facts.pop("output", node.output[0])
        return Layer(node.name, kind, spec, node.input[0], output, self._in_shape(node.input[0], facts),
                     self._shapes.get(output, ()), unusable, facts)

    def _in_shape(self, tensor: str, facts: dict) -> tuple[int, ...]:
        """The shape the layer's spec reads: a Gemm with transA reads its input A transposed."""
        shape = self._shapes.get(tensor, ())
        return tuple(reversed(shape)) if facts.get("transA") else shape

    def _read_conv(self, node):
        weight = self.constant(node.input[1])
        if weight is None:
            return "conv", None, "its weight is not a constant", {}
        if weight.ndim not in (3, 4):
            return "conv", None, f"{weight.ndim - 2}-D convolution is not supported (1-D and 2-D are)", {}
        bias = self.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if len(node.input) > 2 and node.input[2] and bias is None:
            return "conv", None, "its bias is not a constant", {}
        a = _attrs(node)
        n = weight.ndim - 2
        kernel = tuple(weight.shape[2:])
        stride = tuple(a.get("strides", [1] * n))
        dilation = tuple(a.get("dilations", [1] * n))
        auto_pad = a.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            in_shape = self._shapes.get(node.input[0])
            if in_shape is None:
                return "conv", None, "auto_pad SAME with an unknown input shape", {}
            padding = []
            for size, k, s, d in zip(in_shape[2:], kernel, stride, dilation):
                total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
                small, big = total // 2, total - total // 2
                padding.append((small, big) if auto_pad == "SAME_UPPER" else (big, small))
            padding = tuple(padding)
        else:
            pads = list(a.get("pads", [0] * 2 * n))
            padding = tuple((pads[i], pads[i + n]) for i in range(n))
        spec = Conv(weight, bias, stride, padding, dilation, int(a.get("group", 1)))
        return "conv", spec, None, {}

    def _read_conv_transpose(self, node):
        weight = self.constant(node.input[1])
        bias = self.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        a = _attrs(node)
        if weight is None or weight.ndim not in (3, 4):
            return "conv_transpose", None, "its weight is not a constant 1-D/2-D kernel", {}
        n = weight.ndim - 2
        pads = list(a.get("pads", [0] * 2 * n))
        if pads[:n] != pads[n:] or "output_shape" in a or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return "conv_transpose", None, "asymmetric pads, auto_pad or output_shape are not supported", {}
        spec = ConvTranspose(weight, bias, tuple(a.get("strides", [1] * n)), tuple(pads[:n]),
                             tuple(a.get("output_padding", [0] * n)), tuple(a.get("dilations", [1] * n)),
                             int(a.get("group", 1)))
        return "conv_transpose", spec, None, {}

    def _read_gemm(self, node):
        a = _attrs(node)
        b = self.constant(node.input[1])
        if b is None:
            return "linear", None, "its weight (input B) is not a constant", {}
        weight = float(a.get("alpha", 1.0)) * (b if a.get("transB", 0) else b.T)  # (out, in)
        bias = None
        if len(node.input) > 2 and node.input[2]:
            c = self.constant(node.input[2])
            if c is None or c.size not in (1, weight.shape[0]) or (c.ndim == 2 and c.shape[0] != 1):
                return "linear", None, "its bias (input C) is not a constant per-output vector", {}
            bias = float(a.get("beta", 1.0)) * np.broadcast_to(c.reshape(-1), (weight.shape[0],)).astype(weight.dtype)
        return "linear", Linear(weight.astype(np.float32), bias), None, {"transA": bool(a.get("transA", 0))}

    def _read_matmul(self, node):
        w = self.constant(node.input[1])
        if w is None or w.ndim != 2:
            return None  # a MatMul of two activations is not a layer
        facts, bias = {}, None
        users = self._users(node.output[0])
        if len(users) == 1 and users[0].op_type == "Add":
            add = users[0]
            other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
            c = self.constant(other)
            if c is not None and c.size == w.shape[1] and c.reshape(-1).shape == (w.shape[1],):
                bias = c.reshape(-1)
                facts = {"nodes_extra": [add.name], "output": add.output[0]}
        return "linear", Linear(w.T.copy(), bias), None, facts

    def _read_bn(self, node):
        a = _attrs(node)
        if a.get("training_mode", 0) or len(node.output) > 1:
            return "batchnorm", None, "runs in training mode (batch statistics)", {}
        arrays = [self.constant(name) for name in node.input[1:5]]
        if any(x is None for x in arrays):
            return "batchnorm", None, "its statistics are graph inputs, not constants", {}
        gamma, beta, mean, var = arrays
        return "batchnorm", BatchNorm(mean, var, gamma, beta, float(a.get("epsilon", 1e-5))), None, {}

    def _users(self, tensor: str) -> list[onnx.NodeProto]:
        return [n for n in self.model.graph.node if tensor in n.input or tensor in _subgraph_reads(n)]

    def consumers(self, tensor: str) -> list[str]:
        users = [n.name for n in self._users(tensor)]
        if tensor in self.output_names:
            users.append(GRAPH_OUTPUT)
        return users

    def consumer_ops(self, tensor: str) -> list[str]:
        ops = [n.op_type for n in self._users(tensor)]
        return ops + [GRAPH_OUTPUT] if tensor in self.output_names else ops

    def consumer_outputs(self, tensor: str) -> list[tuple[str, str]]:
        pairs = [(n.op_type, n.output[0] if n.output else "") for n in self._users(tensor)]
        return pairs + [(GRAPH_OUTPUT, "")] if tensor in self.output_names else pairs

    def unknown_ops(self) -> list[tuple[str, str]]:
        unknown = []
        for node in self.model.graph.node:
            domain = node.domain or "ai.onnx"
            if domain != "ai.onnx" or not onnx.defs.has(node.op_type):
                unknown.append((node.name, f"{node.domain}.{node.op_type}" if node.domain else node.op_type))
        return unknown

    def total_params(self) -> int:
        # float weights, and quantized ones (8-bit weights, 32-bit biases) with them; not shapes or indices;
        # wherever they live: initializers, Constant nodes, ConstantOfShape (not the copies that
        # Identity / Transpose / DequantizeLinear make of them)
        held = list(self.model.graph.initializer) + [self._constants[name] for name in self._computed]
        return int(sum(int(np.prod(t.dims)) for t in held
                       if helper.tensor_dtype_to_np_dtype(t.data_type) in _PARAM_DTYPES and t.name not in self._scales))

    # ---- editing ----------------------------------------------------------------------
    def copy(self) -> "OnnxGraph":
        clone = OnnxGraph.__new__(OnnxGraph)
        clone.model = copy.deepcopy(self.model)
        clone.source = self.source
        clone.training = self.training
        clone.coding = self.coding  # immutable: shared, not copied
        clone._inputs = list(self._inputs)
        clone._invalidate()
        return clone

    def eval(self) -> "OnnxGraph":
        return self.copy()  # an ONNX graph is an inference graph

    def replace(self, layer_names: Sequence[str], specs: Sequence[Spec]) -> None:
        chain = [self.layer(n) for n in layer_names]
        doomed = [name for layer in chain for name in layer.facts["nodes"] + layer.facts.get("nodes_extra", [])]
        nodes = list(self.model.graph.node)
        position = min(i for i, n in enumerate(nodes) if n.name in doomed)
        prefix = self._free_prefix(chain[0].name)
        source = chain[0].input
        new_nodes, initializers = [], []
        if chain[0].facts.get("transA"):
            new_nodes.append(helper.make_node("Transpose", [source], [f"{prefix}_xT"], name=f"{prefix}_transpose"))
            source = f"{prefix}_xT"
        shape = tuple(chain[0].in_shape)
        for i, spec in enumerate(specs):
            out = chain[-1].output if i == len(specs) - 1 else f"{prefix}_f{i}"
            made_nodes, made_inits = spec_nodes(spec, source, out, f"{prefix}_f{i}", len(shape))
            new_nodes += made_nodes
            initializers += made_inits
            source = out
            shape = spec.out_shape(shape)  # a Reshape changes the rank the next spec reads
        kept = [n for n in nodes if n.name not in doomed]
        del self.model.graph.node[:]
        self.model.graph.node.extend(kept[:position] + new_nodes + kept[position:])
        self.model.graph.initializer.extend(initializers)
        self._drop_dead_nodes()
        self._drop_unused_initializers()
        _allow_initializers_outside_inputs(self.model)
        if any(n.op_type == "Einsum" for n in new_nodes):
            self.model = upgraded_opset(self.model, 12, self.source, "an Einsum (the Tensor-Train layer)")
        elif any(n.op_type == "Gemm" and len(n.input) < 3 for n in new_nodes):
            self.model = upgraded_opset(self.model, 11, self.source, "a Gemm without bias (optional C)")
        self._invalidate()

    def upgrade_opset(self, version: int, why: str) -> bool:
        """Raise the graph to opset `version` (ONNX's version converter); True when it changed."""
        before = opset_version(self.model)
        self.model = upgraded_opset(self.model, version, self.source, why)
        self._invalidate()
        return opset_version(self.model) != before

    def materialize_weights(self) -> list[str]:
        """Weights and biases of the layers that nodes compute (Constant, ConstantOfShape, a Transpose
        of an initializer, ...) become initializers; returns their names.

        Tools that work on initializers (onnxruntime's quantizer takes any other weight for an
        activation and quantizes it per tensor at run time) then see every weight. An exact rewrite:
        the values are the ones the nodes computed. (onnxscript's constant folder does not do it for
        old files: initializers that IR < 4 lists as graph inputs count as overridable there.)
        """
        initializers = {t.name for t in self.model.graph.initializer}
        lifted = {}
        for layer in self.layers():
            if layer.spec is None:
                continue
            node = next(n for n in self.model.graph.node if n.name == layer.facts["nodes"][0])
            for name in node.input[1:]:
                if name and name not in initializers and name not in self._quantized and name in self._constants:
                    lifted[name] = numpy_helper.from_array(self.constant(name), name)
        if not lifted:
            return []
        kept = [n for n in self.model.graph.node if not any(o in lifted for o in n.output)]
        del self.model.graph.node[:]
        self.model.graph.node.extend(kept)
        self.model.graph.initializer.extend(lifted.values())
        _allow_initializers_outside_inputs(self.model)
        self._drop_dead_nodes()
        self._drop_unused_initializers()
        self._invalidate()
        return sorted(lifted)

    def _free_prefix(self, base: str) -> str:
        base = base.replace("/", "_").replace(":", "_").strip("_") or "layer"
        taken = {n.name for n in self.model.graph.node} | {t.name for t in self.model.graph.initializer}
        name, i = base, 1
        while any(t == name or t.startswith(name + "_f") for t in taken):
            name, i = f"{base}_tf{i}", i + 1
        return name

    def _drop_dead_nodes(self) -> None:
        """Drop nodes no one reads any more (a Transpose that fed a replaced weight, say)."""
        while True:
            used = _used_names(self.model.graph) | set(self.output_names)
            live = [n for n in self.model.graph.node if any(o in used for o in n.output)]
            if len(live) == len(self.model.graph.node):
                return
            del self.model.graph.node[:]
            self.model.graph.node.extend(live)

    def _drop_unused_initializers(self) -> None:
        used = _used_names(self.model.graph) | {o.name for o in self.model.graph.output}
        kept = [t for t in self.model.graph.initializer if t.name in used]
        del self.model.graph.initializer[:]
        self.model.graph.initializer.extend(kept)
        real_inputs = {i.name for i in self._inputs}
        kept_inputs = [v for v in self.model.graph.input if v.name in real_inputs or v.name in used]
        del self.model.graph.input[:]
        self.model.graph.input.extend(kept_inputs)

    # ---- running and export ------------------------------------------------------------
    def _session(self, record: tuple[str, ...]) -> ort.InferenceSession:
        if record not in self._sessions:
            model = self.model
            if record:
                model = copy.deepcopy(self.model)
                have = set(self.output_names)
                model.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in record if t not in have)
            options = ort.SessionOptions()
            options.log_severity_level = 3
            try:
                self._sessions[record] = ort.InferenceSession(
                    model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            except Exception as e:  # noqa: BLE001
                raise InvalidModelError(f"{self.source}: onnxruntime cannot load the graph: {e}") from e
        return self._sessions[record]

    def run(self, inputs: Mapping[str, np.ndarray], record: Sequence[str] = ()) -> dict[str, np.ndarray]:
        self.check_inputs(inputs)
        record = tuple(dict.fromkeys(record))
        session = self._session(record)
        names = [o.name for o in session.get_outputs()]
        try:
            values = session.run(names, {k: np.asarray(v) for k, v in inputs.items()})
        except Exception as e:  # noqa: BLE001
            raise InvalidModelError(f"{self.source}: onnxruntime failed to run the graph: {e}") from e
        return dict(zip(names, values))

    def check(self) -> None:
        try:
            onnx.checker.check_model(self.model, full_check=False)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"{self.source}: the rewritten ONNX graph fails onnx.checker: {e}") from e

    def save(self, path: str) -> None:
        path = os.fspath(path)
        if os.path.exists(path) and os.path.exists(self.source) and os.path.samefile(path, self.source):
            raise ExportError(f"refusing to write over the input file {self.source!r}; choose another output path")
        ext = os.path.splitext(path)[1].lower()
        if ext not in (".onnx", ".tfz"):
            raise ExportError(f"cannot write {path!r}: an ONNX graph saves as .onnx or .tfz (k-means-coded)")
        self.check()
        if ext == ".tfz":
            from .tfz import save_tfz  # tfz builds on this module
            save_tfz(self, path)
            return
        try:
            onnx.save(self.model, path)
        except OSError as e:
            raise ExportError(f"{self.source}: writing {path!r} failed: {e}") from e

    def to_onnx(self) -> onnx.ModelProto:
        return self.model

    def to_torch(self):
        raise ExportError(
            f"{self.source}: this graph was loaded from ONNX and stays ONNX (no round trip through torch); "
            "use .save('out.onnx') or .run(...)")


def _used_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node reads, inside subgraphs (If/Loop/Scan bodies) too: they may read outer names."""
    used = set()
    for node in graph.node:
        used.update(node.input)
        used |= _subgraph_reads(node)
    return used


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    used = set()
    for attribute in node.attribute:
        subgraphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
        for subgraph in subgraphs:
            used |= _used_names(subgraph)
    return used


def _allow_initializers_outside_inputs(model: onnx.ModelProto) -> None:
    """IR < 4 requires every initializer to be a graph input too; the new ones are not (IR 4 came
    with opset 9, the oldest opset the ONNX model zoo uses; nothing else changed in the format)."""
    model.ir_version = max(model.ir_version, 4)


def opset_version(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def upgraded_opset(model: onnx.ModelProto, version: int, source: str, why: str) -> onnx.ModelProto:
    """The model at opset >= `version`, through ONNX's version converter (ops whose meaning changed
    between opsets are rewritten, not just relabelled); the model itself where it is new enough."""
    if opset_version(model) >= version:
        return model
    try:
        converted = onnx.version_converter.convert_version(model, version)
        onnx.checker.check_model(converted)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{source}: {why} needs opset {version}, and ONNX's version converter cannot raise "
                          f"opset {opset_version(model)} to it: {type(e).__name__}: {str(e).strip()[:300]}") from e
    return converted


def load(path: str, input_shapes: Mapping[str, Sequence[int]] | None = None) -> OnnxGraph:
    """An ONNX or .tfz file -> OnnxGraph, kept as ONNX. The file itself is never modified."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CaptureError(f"{path}: no such file")
    if path.lower().endswith(".tfz"):
        from .tfz import load_tfz  # tfz builds on this module
        return load_tfz(path, input_shapes)
    try:
        model = onnx.load(path)
    except Exception as e:  # noqa: BLE001
        raise CaptureError(f"{path}: not a readable ONNX model (truncated or not ONNX): {type(e).__name__}: {e}") from e
    if not model.graph.node:
        raise CaptureError(f"{path}: not a readable ONNX model (truncated or not ONNX): the file holds no graph nodes")
    try:
        onnx.checker.check_model(model)
    except Exception as e:  # noqa: BLE001
        raise CaptureError(f"{path}: the ONNX model is invalid (onnx.checker): {e}") from e
    return OnnxGraph(model, path, input_shapes)
