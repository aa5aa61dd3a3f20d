"""Specs materialized as standard ONNX nodes (the ONNX adapter's half of the spec contract)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .specs import Activation, BatchNorm, Conv, ConvTranspose, GroupMax, Linear, ParallelSum, Reshape, Spec, TTLinear
from .torch_modules import tt_equations


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    array = np.asarray(array)
    # np.array, not np.ascontiguousarray: that one makes a scalar (a Gather index that drops the axis) 1-D
    return numpy_helper.from_array(np.array(array, dtype=array.dtype if array.dtype.kind == "i" else np.float32,
                                            order="C"), name)


def spec_nodes(spec: Spec, x: str, y: str, prefix: str, in_rank: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes computing y = spec(x); initializer names start with `prefix`."""
    inits = []

    def const(suffix: str, array: np.ndarray) -> str:
        inits.append(_init(f"{prefix}.{suffix}", array))
        return inits[-1].name

    if isinstance(spec, Conv):
        inputs = [x, const("weight", spec.weight)] + ([const("bias", spec.bias)] if spec.bias is not None else [])
        pads = [b for b, _ in spec.padding] + [e for _, e in spec.padding]
        node = helper.make_node("Conv", inputs, [y], name=prefix, kernel_shape=list(spec.kernel_size),
                                strides=list(spec.stride), pads=pads, dilations=list(spec.dilation), group=spec.groups)
        return [node], inits
    if isinstance(spec, ConvTranspose):
        inputs = [x, const("weight", spec.weight)] + ([const("bias", spec.bias)] if spec.bias is not None else [])
        node = helper.make_node("ConvTranspose", inputs, [y], name=prefix, kernel_shape=list(spec.kernel_size),
                                strides=list(spec.stride), pads=list(spec.padding) * 2,
                                output_padding=list(spec.output_padding), dilations=list(spec.dilation),
                                group=spec.groups)
        return [node], inits
    if isinstance(spec, Linear):
        if in_rank == 2:
            inputs = [x, const("weight", spec.weight)] + ([const("bias", spec.bias)] if spec.bias is not None else [])
            return [helper.make_node("Gemm", inputs, [y], name=prefix, transB=1)], inits
        weight_t = const("weight_t", spec.weight.T)
        if spec.bias is None:
            return [helper.make_node("MatMul", [x, weight_t], [y], name=prefix)], inits
        matmul = helper.make_node("MatMul", [x, weight_t], [f"{prefix}_mm"], name=prefix)
        add = helper.make_node("Add", [f"{prefix}_mm", const("bias", spec.bias)], [y], name=f"{prefix}_add")
        return [matmul, add], inits
    if isinstance(spec, BatchNorm):
        inputs = [x] + [const(n, getattr(spec, a)) for n, a in
                        (("scale", "gamma"), ("bias", "beta"), ("mean", "mean"), ("var", "var"))]
        return [helper.make_node("BatchNormalization", inputs, [y], name=prefix, epsilon=spec.eps)], inits
    if isinstance(spec, TTLinear):
        return _tt_nodes(spec, x, y, prefix, const), inits
    if isinstance(spec, ParallelSum):
        return _parallel_nodes(spec, x, y, prefix, in_rank, const, inits)
    if isinstance(spec, Activation):
        if spec.function == "relu":
            return [helper.make_node("Relu", [x], [y], name=prefix)], inits
        return [helper.make_node("LeakyRelu", [x], [y], name=prefix, alpha=float(spec.alpha))], inits
    if isinstance(spec, Reshape):
        shape = const("shape", np.array([-1, *spec.shape], np.int64))
        return [helper.make_node("Reshape", [x, shape], [y], name=prefix)], inits
    if isinstance(spec, GroupMax):
        return _group_max_nodes(spec, x, y, prefix, in_rank, const), inits
    raise TypeError(f"unknown layer spec {type(spec).__name__}")


def _tt_nodes(spec: TTLinear, x: str, y: str, prefix: str, const) -> list[onnx.NodeProto]:
    """Reshape -> one Einsum per core -> Reshape, the same chain as TTLinearModule."""
    nodes = []
    lead = f"{prefix}_lead"
    # keep the leading axes of x: shape(x)[:-1] ++ [out_features]
    nodes.append(helper.make_node("Shape", [x], [f"{prefix}_full_shape"], name=f"{prefix}_shape"))
    nodes.append(helper.make_node("Slice", [f"{prefix}_full_shape", const("start", np.array([0], np.int64)),
                                            const("end", np.array([-1], np.int64))],
                                  [f"{prefix}_shape"], name=f"{prefix}_lead_dims"))
    nodes.append(helper.make_node("Concat", [f"{prefix}_shape", const("out_dim", np.array([spec.out_features], np.int64))],
                                  [lead], name=f"{prefix}_out_shape", axis=0))
    state_shape = const("state_shape", np.array([-1, 1, *spec.in_modes], np.int64))
    nodes.append(helper.make_node("Reshape", [x, state_shape], [f"{prefix}_s0"], name=f"{prefix}_reshape_in"))
    for k, (equation, core) in enumerate(zip(tt_equations(len(spec.cores)), spec.cores)):
        nodes.append(helper.make_node("Einsum", [const(f"core{k}", core), f"{prefix}_s{k}"], [f"{prefix}_s{k + 1}"],
                                      name=f"{prefix}_einsum{k}", equation=equation))
    last = f"{prefix}_s{len(spec.cores)}"
    if spec.bias is not None:
        nodes.append(helper.make_node("Reshape", [last, lead], [f"{prefix}_nb"], name=f"{prefix}_reshape_out"))
        nodes.append(helper.make_node("Add", [f"{prefix}_nb", const("bias", spec.bias)], [y], name=f"{prefix}_add"))
    else:
        nodes.append(helper.make_node("Reshape", [last, lead], [y], name=f"{prefix}_reshape_out"))
    return nodes


def _group_max_nodes(spec: GroupMax, x: str, y: str, prefix: str, in_rank: int, const) -> list[onnx.NodeProto]:
    """Reshape to (N, groups, P), one Gather of a scalar index per group, one Max: the same meaning in every
    opset from 9 on (ReduceMax moved its axes to an input at opset 18, Split its sizes at 13 and 18)."""
    if in_rank != 2:
        raise TypeError(f"GroupMax: the ONNX emitter takes (N, groups * P) inputs, not rank {in_rank}")
    grouped = f"{prefix}_grouped"
    nodes = [helper.make_node("Reshape", [x, const("shape", np.array([0, spec.groups, -1], np.int64))], [grouped],
                              name=f"{prefix}_reshape")]
    blocks = []
    for m in range(spec.groups):
        blocks.append(f"{prefix}_g{m}")
        nodes.append(helper.make_node("Gather", [grouped, const(f"g{m}", np.array(m, np.int64))], [blocks[-1]],
                                      name=f"{prefix}_gather{m}", axis=1))
    nodes.append(helper.make_node("Max", blocks, [y], name=prefix))
    return nodes


def _parallel_nodes(spec: ParallelSum, x: str, y: str, prefix: str, in_rank: int, const,
                    inits: list) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Per branch: Gather(axis) of its channels (int64 initializer), its chain of nodes; then Adds.

    Node names are `{prefix}_b{i}_f{j}`, so every conv inside is an ordinary layer for later passes.
    """
    nodes, outputs = [], []
    axis = spec.axis % in_rank
    for i, (channels, branch) in enumerate(zip(spec.channels, spec.biased_branches())):
        source = x
        if channels is not None:
            source = f"{prefix}_b{i}_in"
            nodes.append(helper.make_node("Gather", [x, const(f"b{i}.channels", np.asarray(channels, np.int64))],
                                          [source], name=f"{prefix}_b{i}_gather", axis=axis))
        for j, layer in enumerate(branch):
            last = j == len(branch) - 1
            out = (y if len(spec.branches) == 1 else f"{prefix}_b{i}_out") if last else f"{prefix}_b{i}_f{j}_y"
            made_nodes, made_inits = spec_nodes(layer, source, out, f"{prefix}_b{i}_f{j}", in_rank)
            nodes += made_nodes
            inits += made_inits
            source = out
        outputs.append(source)
    total = outputs[0]
    for k, other in enumerate(outputs[1:], start=1):
        out = y if k == len(outputs) - 1 else f"{prefix}_sum{k}"
        nodes.append(helper.make_node("Add", [total, other], [out], name=f"{prefix}_add{k}"))
        total = out
    return nodes, inits
