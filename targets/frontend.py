"""Graph -> Relax IRModule: torch graphs through torch.export, ONNX graphs through the ONNX frontend.

The frontends report an op they cannot translate with an AssertionError ("Unsupported
function types [...]") or tvm.error.OpNotImplemented that names neither the node nor the
layer. We check the ops ourselves first, against the frontend's own converter table, and
turn any later frontend failure into a BuildError naming the node being translated.
"""
from __future__ import annotations

import types
from typing import Any

from tensorfold.ir.errors import BuildError, ExportError
from tensorfold.ir.onnx_fold import fold_shapes


def to_relax(graph) -> tuple[Any, str]:
    """(IRModule with a "main" whose weights are bound constants, frontend name)."""
    from tensorfold.ir.fx_graph import FxGraph
    from tensorfold.ir.onnx_graph import OnnxGraph

    if isinstance(graph, FxGraph):
        return _from_torch(graph), "torch.export"
    if isinstance(graph, OnnxGraph):
        return _from_onnx(graph), "onnx"
    raise BuildError(f"build expects a tensorfold Graph (tf.capture / tf.load), got {type(graph).__name__}")


# ---- torch ---------------------------------------------------------------------------

def _from_torch(graph) -> Any:
    import torch
    from tvm.relax.frontend.torch import from_exported_program
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    program = graph.to_exported_program()
    try:
        # The frontend would decompose too; doing it here lets us check the ops it will see.
        program = program.run_decompositions()
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{graph.source}: torch.export decomposition failed: {e}") from e
    known = ExportedProgramImporter().convert_map
    missing = [node for node in program.graph.nodes
               if node.op == "call_function" and _torch_op(node) not in known]
    if missing:
        details = "; ".join(f"node {n.name!r} op {_torch_op(n)!r}{_module_of(n)}" for n in missing[:10])
        raise BuildError(
            f"{graph.source}: the TVM Relax torch frontend does not support "
            f"{len(missing)} node(s): {details}. Replace those layers (or export the model to ONNX and "
            "build that), or leave this model to the torch / onnxruntime engines")
    try:
        with torch.no_grad():
            return from_exported_program(program, keep_params_as_input=False, run_ep_decomposition=False)
    except Exception as e:  # noqa: BLE001 - re-raised naming the node being translated
        raise BuildError(f"{graph.source}: the TVM Relax torch frontend failed{_failing_node(e)}: "
                         f"{type(e).__name__}: {_first_line(e)}") from e


def _torch_op(node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def _module_of(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, module_type = list(stack.values())[-1]
    path = str(path).replace("L['self'].", "").replace("L__self__.", "")
    type_name = getattr(module_type, "__name__", str(module_type)).rsplit(".", 1)[-1]
    return f" (in layer {path!r}, {type_name})"


# ---- ONNX ----------------------------------------------------------------------------

def _from_onnx(graph) -> Any:
    from tvm.relax.frontend.onnx import from_onnx
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    shapes = {info.name: list(info.shape) for info in graph.inputs}
    model = fold_shapes(graph.to_onnx(), shapes, graph.source)
    known = _get_convert_map()
    missing = [node for node in model.graph.node
               if node.op_type not in known and node.op_type not in ("Constant", "If")]
    if missing:
        details = "; ".join(f"node {n.name!r} op {n.op_type!r}" for n in missing[:10])
        raise BuildError(
            f"{graph.source}: the TVM Relax ONNX frontend does not support {len(missing)} node(s): {details}. "
            "Rewrite those nodes with supported ONNX ops, or leave this model to onnxruntime")
    dtypes = {info.name: info.dtype for info in graph.inputs}
    try:
        return from_onnx(model, shape_dict=shapes, dtype_dict=dtypes, keep_params_in_input=False)
    except Exception as e:  # noqa: BLE001 - re-raised naming the node being translated
        raise BuildError(f"{graph.source}: the TVM Relax ONNX frontend failed{_failing_node(e)}: "
                         f"{type(e).__name__}: {_first_line(e)}") from e


# ---- naming the node a frontend failed on --------------------------------------------

def _failing_node(error: BaseException) -> str:
    """' at node X (op Y)' from the innermost frontend frame translating a node, else ''."""
    found = ""
    tb: types.TracebackType | None = error.__traceback__
    while tb is not None:
        node = tb.tb_frame.f_locals.get("node")
        if node is not None:
            if hasattr(node, "op_type"):           # onnx.NodeProto
                found = f" at node {node.name!r} (op {node.op_type!r})"
            elif hasattr(node, "target") and hasattr(node, "op"):  # torch.fx.Node
                found = f" at node {node.name!r} (op {_torch_op(node)!r}{_module_of(node)})"
        tb = tb.tb_next
    return found


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""
