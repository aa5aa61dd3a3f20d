"""The alds pass: one shared error ε for all layers, each layer its own chunks k and rank j.

The math is in `passes/decompose/alds.py`, the bisection of the shared error in
`passes/ranks/alds_allocation.py`; this module picks the layers, splices the factors in through
the graph view and reports per layer k, j, its error figures and the spectral error reached.
"""
from __future__ import annotations

import time
from typing import Any

from tensorfold.ir.errors import PipelineError
from tensorfold.ir.graph import Graph, Layer
from tensorfold.ir.specs import Conv

from ..ranks import alds_allocation as allocation
from ..decompose import alds as alds_math
from ..equivalent import dense_weight, weight_error
from .factorize import is_selected, selected_layers
from ..progress import progress_bar
from ..ranks.budget import Budget, BudgetError, parse_budget
from ..registry import Option, PassContext, register
from ..report import PassReport
from .replace import replace_and_record

LINEAR_NOTE = "Linear: k=1 (a grouped first factor needs a conv), plain SVD"
MEASURES = ("bound", "paper")


def _check_options(options: dict) -> None:
    if (options["budget"] is None) == (options["epsilon"] is None):
        raise PipelineError("alds: give budget=params:<fraction> or flops:<fraction>, or a fixed epsilon=, "
                            "exactly one of them")
    if options["epsilon"] is not None and options["epsilon"] < 0:
        raise PipelineError(f"alds: epsilon={options['epsilon']} must be >= 0 (a relative spectral error)")
    if options["force"] and options["epsilon"] is None:
        raise PipelineError("alds: force=true applies with epsilon= only (a budget counts what factoring saves)")
    if options["chunks"] < 0:
        raise PipelineError(f"alds: chunks={options['chunks']} must be >= 1, or 0 to choose per layer")
    if options["error"] not in MEASURES:
        raise PipelineError(f"alds: error={options['error']!r}: use {' or '.join(MEASURES)}")


def _chunk_choices(layer: Layer, forced: int) -> list[int] | str:
    """The k this layer may take, or why it takes none."""
    if not forced or not isinstance(layer.spec, Conv):
        return alds_math.chunk_choices(layer.spec)
    if layer.spec.in_channels % forced:
        return f"chunks={forced} does not divide the {layer.spec.in_channels} input channels"
    return [forced]


def _tables(graph: Graph, options: dict, context: PassContext,
            report: PassReport) -> list[tuple[Layer, allocation.LayerTable]]:
    for layer in graph.layers():  # selected_layers lists conv/linear only: say why transposed convs stay
        if layer.kind == "conv_transpose" and is_selected(layer.name, options):
            report.skip(layer.name, "transposed conv: alds factors Conv and Linear layers")
    layers, tables = [], []
    for layer in selected_layers(graph, options, report):
        reason = alds_math.check_alds(layer.spec)
        choices = _chunk_choices(layer, options["chunks"]) if reason is None else reason
        if isinstance(choices, str):
            report.skip(layer.name, choices)
        else:
            layers.append((layer, choices))
    with progress_bar("alds spectra", total=len(layers), enabled=context.progress) as advance:
        for layer, choices in layers:
            tables.append((layer, allocation.layer_table(layer.name, layer.spec, layer.in_shape, choices,
                                                         options["error"])))
            advance()
    return tables


def alds(graph: Graph, options: dict, context: PassContext) -> tuple[Graph, PassReport]:
    """Conv -> grouped kxk (k input-channel chunks, rank j each) -> 1x1; one error ε for all layers (ALDS)."""
    _check_options(options)
    report = PassReport("alds")
    graph = graph.copy()
    order = {l.name: i for i, l in enumerate(graph.layers())}
    budget = _budget(options)
    tables = _tables(graph, options, context, report)
    result = _allocate([t for _, t in tables], budget, options)
    with progress_bar("alds", total=len(tables), enabled=context.progress) as advance:
        for layer, table in tables:
            choice = result.choices[layer.name]
            if choice is None:
                report.skip(layer.name, f"at ε={result.epsilon:.4g} no (k, j) within ε costs less than the layer", method="alds", params_before=table.original.params,
                            flops_before=table.original.flops)
            else:
                _factor_one(graph, graph.layer(layer.name), choice, table.norm, context, report)
            advance()
    report.records.sort(key=lambda r: order.get(r.layer, -1))
    report.summary.update(_summary(options, budget, result, len(tables)))
    return graph, report


def _budget(options: dict) -> Budget | None:
    if options["budget"] is None:
        return None
    try:
        return parse_budget(options["budget"])
    except PipelineError as e:
        raise PipelineError(f"alds: {e}") from None


def _allocate(tables: list[allocation.LayerTable], budget: Budget | None, options: dict) -> allocation.Allocation:
    if budget is None:
        return allocation.at_epsilon(tables, options["epsilon"], "params", options["force"])
    try:
        return allocation.allocate(tables, budget)
    except BudgetError as e:
        raise BudgetError(f"alds: {e}", e.smallest_fraction) from None


def _factor_one(graph: Graph, layer: Layer, choice: allocation.Choice, norm: float, context: PassContext,
                report: PassReport) -> None:
    started = time.perf_counter()
    specs = alds_math.alds_specs(layer.spec, choice.chunks, choice.rank)
    matrix = alds_math.fold(layer.spec)
    residual = matrix - dense_weight(specs).reshape(matrix.shape)
    details: dict[str, Any] = {
        "chunks": choice.chunks, "rank": choice.rank, "error_allocated": choice.error,
        "upper_bound": choice.upper_bound, "paper_error": choice.paper_error,
        "spectral_error": alds_math.spectral_norm(residual) / norm,
        "weight_error": weight_error(layer.spec, specs), "factor_layers": len(specs)}
    if layer.kind == "linear":
        details["note"] = LINEAR_NOTE
    replace_and_record(graph, layer, specs, f"alds[k={choice.chunks}, j={choice.rank}]", details, context, report,
                       started)


def _summary(options: dict, budget: Budget | None, result: allocation.Allocation, candidates: int) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "epsilon": result.epsilon,
        "error_measure": ("upper bound sqrt(sum_i s_j+1(W_i)^2)/||W||_2" if options["error"] == "bound"
                          else "the paper's max_i s_j+1(W_i)/||W||_2 (a lower bound on each layer's error)"),
        "chunk_choices": (f"k={options['chunks']}" if options["chunks"]
                          else f"divisors of S up to {alds_math.MAX_CHUNKS}") + "; Linear k=1",
    }
    if budget is not None:
        summary["budget"] = f"{budget.kind}:{budget.fraction:g} of {candidates} candidate layers"
        summary["budget_reached"] = result.fraction
    return summary


register("alds", {
    "budget": Option(str, None, "params:<fraction> or flops:<fraction> of the candidate layers; bisects one "
                                "shared error ε"),
    "epsilon": Option(float, None, "instead of a budget: a fixed shared error ε"),
    "error": Option(str, "bound", "what ε limits: bound (an upper bound on ||W - Ŵ||_2 / ||W||_2, a guarantee) or "
                                  "paper (the paper's max over chunks, a lower bound: errors exceed ε by up to "
                                  "sqrt(k))"),
    "chunks": Option(int, 0, f"force k input-channel chunks for every conv (0: the cheapest among the divisors "
                             f"of S up to {alds_math.MAX_CHUNKS})"),
    "force": Option(bool, False, "with epsilon=: factor even where it does not reduce the layer's cost "
                                 "(e.g. to check full rank)"),
    "include": Option(str, "", "glob patterns on layer names, separated by |"),
    "exclude": Option(str, "", "glob patterns on layer names, separated by |"),
})(alds)
