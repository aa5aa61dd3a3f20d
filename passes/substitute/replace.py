"""The tail every substitution pass shares: swap a layer for its new specs and record what that cost."""
from __future__ import annotations

import time
from typing import Any

from tensorfold.ir.graph import Graph, Layer
from tensorfold.ir.specs import Spec, chain_cost

from ..measure import layer_error
from ..registry import PassContext
from ..report import LayerRecord, PassReport


def replace_and_record(graph: Graph, layer: Layer, specs: list[Spec], method: str, details: dict[str, Any],
                       context: PassContext, report: PassReport, started: float) -> None:
    """Replace `layer` by `specs` in place; the record gives params and FLOPs before -> after, the layer's
    output error on random and calibration inputs (measured before the swap) and the seconds since `started`."""
    before, after = chain_cost([layer.spec], layer.in_shape), chain_cost(specs, layer.in_shape)
    err_random, err_calibration = layer_error(graph, [layer], specs, context.inputs)
    graph.replace([layer.name], specs)
    report.add(LayerRecord(layer.name, "replaced", method=method,
                           params_before=before.params, params_after=after.params,
                           flops_before=before.flops, flops_after=after.flops,
                           error_random=err_random, error_calibration=err_calibration, details=details,
                           seconds=time.perf_counter() - started))
