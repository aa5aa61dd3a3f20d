"""Fold what fixed input shapes make constant, so a graph with shape subgraphs imports as static.

Converters other than torch.onnx.export compute reshape targets and pads at run time
(`Shape -> Gather -> Concat -> Reshape`, Swin's `ConstantOfShape -> ... -> Pad`) and leave dims
symbolic; TVM's Relax ONNX frontend needs them as constants. With the input shapes fixed,
onnxsim (a kept library: shape inference plus constant folding through onnxruntime) turns those
subgraphs into constants. onnxscript's optimizer was tried first: it does not fold
ConstantOfShape, so Swin's pads stayed dynamic. onnxsim keeps Q/DQ nodes as they are.
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys
from typing import Iterator, Mapping, Sequence

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


@contextlib.contextmanager
def _native_output_silenced() -> Iterator[None]:
    """fds 1 and 2 to /dev/null for a while: C++ code prints there, past Python's sys.stdout."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            for fd, copy_of in zip((1, 2), saved):
                os.dup2(copy_of, fd)
                os.close(copy_of)


def fold_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]], source: str) -> onnx.ModelProto:
    """`model` with its inputs fixed and every shape computation folded into constants."""
    import onnxsim

    fixed = with_fixed_inputs(model, input_shapes)
    try:
        with _native_output_silenced():  # onnxsim prints a line per node it cannot fold
            folded, checked = onnxsim.simplify(fixed)
        onnx.checker.check_model(folded)
    except Exception as e:  # noqa: BLE001 - named, with the model
        raise ExportError(f"{source}: folding the shape computations for the fixed input shapes failed: "
                          f"{type(e).__name__}: {str(e).strip()[:300]}") from e
    if not checked:
        raise ExportError(f"{source}: onnxsim's folded graph does not match the original on random inputs")
    return folded
