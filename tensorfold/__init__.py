"""tensorfold: capture a model, rewrite it with passes, build it with TVM, measure it per target.

    import tensorfold as tf
    g = tf.capture(model, example_inputs)     # or tf.load("model.onnx")
    g2, report = tf.compress(g, "fold_bn")
    artifact = tf.build(g2, "x86", "out/", tune_trials=64)
"""
from __future__ import annotations

from typing import Any

from tensorfold.ir import Graph, capture, load
from tensorfold.ir.errors import TensorfoldError
from tensorfold.passes import Report, run as _run_pipeline
from tensorfold.build import build
from tensorfold.measure import measure

__version__ = "0.1.0"


def compress(graph_or_module: Any, passes: Any, calibration: Any = None, example_inputs: Any = None,
             progress: bool = False) -> tuple[Graph, Report]:
    """Run a pipeline ("fold_bn, svd(rank=8)" or [(name, options), ...]) on a Graph or a module.

    `calibration`: a list of input dicts ({input name: array}), or a list of arrays for a
    single-input graph; errors are then also measured on it.
    """
    graph = graph_or_module
    if not isinstance(graph, Graph):
        if example_inputs is None:
            raise TensorfoldError("compress(module, ...) needs example_inputs=...; or pass tf.capture(module, inputs)")
        graph = capture(graph_or_module, example_inputs)
    feeds = None
    if calibration is not None:
        names = [i.name for i in graph.inputs]
        feeds = [c if isinstance(c, dict) else {names[0]: _numpy(c)} for c in calibration]
        feeds = [{k: _numpy(v) for k, v in f.items()} for f in feeds]
    return _run_pipeline(graph, passes, calibration=feeds, progress=progress)


def _numpy(value: Any):
    import numpy as np
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


__all__ = ["Graph", "Report", "TensorfoldError", "build", "capture", "compress", "load", "measure"]
