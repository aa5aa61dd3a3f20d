"""Fold what fixed input shapes make constant, so a graph with shape subgraphs imports as static.

Converters other than torch.onnx.export compute reshape targets at run time
(`Shape -> Gather -> Concat -> Reshape`) and leave dims symbolic; TVM's Relax ONNX frontend
needs them as constants. With the input shapes fixed, onnxscript's optimizer (shape inference
plus constant folding, a kept library) turns those subgraphs into constants. Exact: it only
evaluates what no input can change.
"""
from __future__ import annotations

import copy
import logging
from typing import Mapping, Sequence

import onnx

from .errors import ExportError


def with_fixed_inputs(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """A copy of `model` whose graph inputs have the given static shapes (other dims as they are)."""
    fixed = copy.deepcopy(model)
    for value in fixed.graph.input:
        if value.name in input_shapes:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, input_shapes[value.name]):
                dim.Clear()
                dim.dim_value = int(size)
    return fixed


def fold_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]], source: str) -> onnx.ModelProto:
    """`model` with its inputs fixed and every shape computation folded into constants."""
    import onnxscript.optimizer

    fixed = with_fixed_inputs(model, input_shapes)
    quiet = logging.getLogger("onnxscript")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it logs every op it cannot fold
    try:
        folded = onnxscript.optimizer.optimize(fixed)
        onnx.checker.check_model(folded)
    except Exception as e:  # noqa: BLE001 - named, with the model
        raise ExportError(f"{source}: folding the shape computations for the fixed input shapes failed: "
                          f"{type(e).__name__}: {str(e).strip()[:300]}") from e
    finally:
        quiet.setLevel(level)
    return folded
