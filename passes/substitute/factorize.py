"""Factorization passes (svd, spatial_svd, tucker2, cp, tt): pick layers and ranks, splice factors in.

The math is in `passes/decompose` and the rank policies in `passes/ranks/policy.py`; this module
only decides which layers to touch, asks for ranks, and replaces each layer by its factor
chain through the graph view, measuring what every replacement costs in accuracy.
"""
from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass
from typing import Any, Callable

from tensorfold.ir.errors import PipelineError
from tensorfold.ir.graph import Graph, Layer
from tensorfold.ir.specs import Spec, chain_cost

from .. import decompose as dec
from ..ranks import policy as rp
from .data_factorize import LayerMoments, data_details, data_specs, layer_moments, sigma_energy_ranks
from ..equivalent import weight_error
from ..progress import progress_bar
from ..registry import Option, PassContext, register
from ..report import PassReport
from .replace import replace_and_record


@dataclass(frozen=True)
class Method:
    policy_name: Callable[[dict], str]                     # the rank_policy method key
    realise: Callable[[Spec, tuple[int, ...], dict], list[Spec]]
    default_policy: str


METHODS: dict[str, Method] = {
    "svd": Method(lambda o: "svd", lambda s, r, o: dec.svd_specs(s, r[0]), "energy=0.95"),
    "spatial_svd": Method(lambda o: "spatial_svd", lambda s, r, o: dec.spatial_svd_specs(s, r[0]), "ratio=2"),
    "tucker2": Method(lambda o: "tucker2",
                      lambda s, r, o: dec.tucker2_specs(s, (r[0], r[1]), n_iter_max=o["n_iter_max"], tol=o["tol"]),
                      "evbmf"),
    "cp": Method(lambda o: o["variant"],
                 lambda s, r, o: dec.cp_specs(s, r[0], o["variant"], method=o["method"], n_iter_max=o["n_iter_max"],
                                              tol=o["tol"],
                                              **({"epc_iter_max": o["epc_iter_max"]} if o["method"] == "epc" else {})),
                 "ratio=2"),
    "tt": Method(lambda o: "tt", lambda s, r, o: [dec.tt_spec(s, r)], "ratio=2"),
}

_POLICY_KEYS = ("rank", "ratio", "energy", "budget")


def _policy_text(method: str, options: dict) -> str:
    given = [k for k in _POLICY_KEYS if options.get(k) not in (None, "")]
    if len(given) > 1:
        raise PipelineError(f"{method}: give one rank policy, not {' and '.join(given)}")
    if not given:
        text = METHODS[method].default_policy
    elif given[0] == "rank":
        value = str(options["rank"]).replace(" ", "")
        text = value if value.startswith("evbmf") else f"rank={value}"
    else:
        text = f"{given[0]}={options[given[0]]}"
    if options.get("weaken") is not None:
        if not text.startswith("evbmf"):
            raise PipelineError(f"{method}: weaken= applies to rank=evbmf only")
        text = f"evbmf(weaken={options['weaken']})"
    return text


def _patterns(text: str) -> list[str]:
    return [p for p in (text or "").split("|") if p]


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def is_selected(name: str, options: dict) -> bool:
    """Whether the layer `name` passes the pass's include= / exclude= patterns."""
    include, exclude = _patterns(options["include"]), _patterns(options["exclude"])
    return (not include or _matches(name, include)) and not (exclude and _matches(name, exclude))


def selected_layers(graph: Graph, options: dict, report: PassReport) -> list[Layer]:
    layers = [l for l in graph.layers() if l.kind in ("conv", "linear")]
    include, exclude = _patterns(options["include"]), _patterns(options["exclude"])
    for label, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(l.name, pattern) for l in layers):
                report.warnings.append(f"{label} pattern {pattern!r} matches no conv/linear layer")
    chosen = []
    for layer in layers:
        if include and not _matches(layer.name, include):
            continue
        if exclude and _matches(layer.name, exclude):
            report.skip(layer.name, "excluded by pattern")
            continue
        if layer.spec is None or layer.unusable:
            report.skip(layer.name, layer.unusable or "unusable")
            continue
        chosen.append(layer)
    return chosen


def _ranks_by_layer(method: str, key: str, layers: list[Layer], options: dict, report: PassReport,
                    moments: dict[str, LayerMoments] | None = None) -> dict[str, tuple[tuple[int, ...], str | None]]:
    """Ranks (and a note) for every layer the method applies to; others are skipped here."""
    applicable = []
    for layer in layers:
        reason = rp.METHODS[key].check(layer.spec)
        if reason is not None:
            report.skip(layer.name, reason)
        else:
            applicable.append(layer)
    if options.get("budget"):
        budget = rp.parse_budget(options["budget"])
        candidates = [rp.layer_candidate(l.name, key, l.spec, l.in_shape) for l in applicable]
        allocation = rp.allocate_budget(candidates, budget)
        report.warnings.append(f"budget {budget.kind}:{budget.fraction:g} over {len(applicable)} layers: "
                               f"reached {allocation.fraction:.4f} of the {budget.kind} of these layers")
        chosen = {}
        for layer in applicable:
            ranks = allocation.ranks_by_layer.get(layer.name)
            if ranks is None:
                report.skip(layer.name, "the budget keeps this layer unfactored")
            else:
                chosen[layer.name] = (tuple(ranks), None)
        return chosen
    policy = rp.parse_rank_policy(_policy_text(method, options))
    chosen = {}
    for layer in applicable:
        try:
            if moments and isinstance(policy, rp.Energy) and key == "svd":  # energy of the outputs, not the weights
                choice = sigma_energy_ranks(policy.tau, layer.spec, moments[layer.name].fit)
            else:
                choice = rp.select_ranks(policy, key, layer.spec)
        except dec.NotFactorable as e:
            report.skip(layer.name, str(getattr(e, "reason", e)))
            continue
        chosen[layer.name] = (choice.ranks, choice.note)
    return chosen


def factorize(method: str, graph: Graph, options: dict, context: PassContext) -> tuple[Graph, PassReport]:
    report = PassReport(method)
    graph = graph.copy()
    key = METHODS[method].policy_name(options)
    order = {l.name: i for i, l in enumerate(graph.layers())}
    layers = selected_layers(graph, options, report)
    moments = None
    if options.get("data"):  # statistics of the pass's input graph, for every layer it may factor
        applicable = [l for l in layers if rp.METHODS[key].check(l.spec) is None]
        moments = layer_moments(method, graph, applicable, context.inputs.calibration, context.progress, report)
    ranks_by_layer = _ranks_by_layer(method, key, layers, options, report, moments)
    with progress_bar(f"{method}", total=len(ranks_by_layer), enabled=context.progress) as advance:
        for layer in layers:
            if layer.name not in ranks_by_layer:
                continue
            ranks, note = ranks_by_layer[layer.name]
            _factor_one(method, key, graph, graph.layer(layer.name), ranks, note, options, context, report,
                        moments[layer.name] if moments else None)
            advance()
    report.records.sort(key=lambda r: order.get(r.layer, -1))
    return graph, report


def _factor_one(method: str, key: str, graph: Graph, layer: Layer, ranks: tuple[int, ...], note: str | None,
                options: dict, context: PassContext, report: PassReport, moments: LayerMoments | None = None) -> None:
    started = time.perf_counter()
    before = chain_cost([layer.spec], layer.in_shape)
    if not options["force"] and not rp.factorization_pays(key, layer.spec, ranks, layer.in_shape):
        report.skip(layer.name, f"factorising at ranks {ranks} would not reduce both params and FLOPs",
                    method=method, params_before=before.params, flops_before=before.flops,
                    details={"ranks": list(ranks)})
        return
    data_run = None
    try:
        if moments is not None:
            data_run = data_specs(method, key, layer.spec, ranks, options, moments)
            specs = data_run.specs
        else:
            specs = METHODS[method].realise(layer.spec, ranks, options)
    except dec.NotFactorable as e:
        report.skip(layer.name, str(getattr(e, "reason", e)))
        return
    details: dict[str, Any] = {"ranks": list(ranks), "weight_error": weight_error(layer.spec, specs),
                               "factor_layers": sum(len(getattr(s, "cores", [s])) for s in specs)}
    if data_run is not None:
        details.update(data_details(layer.spec, data_run, moments))
    if note:
        details["note"] = note
    replace_and_record(graph, layer, specs, f"{method}{list(ranks)}", details, context, report, started)


_COMMON = {
    "rank": Option(str, None, "ranks: an int, a tuple (16,8), or evbmf / evbmf(weaken=0.8)"),
    "ratio": Option(float, None, "constant parameter-reduction rate per layer (musco)"),
    "energy": Option(float, None, "keep the smallest rank with this fraction of spectral energy, in (0, 1]"),
    "budget": Option(str, None, "global: params:<fraction> or flops:<fraction> of the factored layers"),
    "weaken": Option(float, None, "with rank=evbmf: R - w(R - R_evbmf)"),
    "force": Option(bool, False, "factor even where it does not reduce params and FLOPs (e.g. to check full rank)"),
    "include": Option(str, "", "glob patterns on layer names, separated by |"),
    "exclude": Option(str, "", "glob patterns on layer names, separated by |"),
}
def _iterative(n_iter_max: int, tol: float) -> dict[str, Option]:
    return {"n_iter_max": Option(int, n_iter_max, "maximum iterations of the decomposition"),
            "tol": Option(float, tol, "convergence tolerance (change of the relative error)")}


_DATA = {
    "data": Option(bool, False, "minimise the error on calibration data (the Sigma-norm of Kalle et al.), not on the "
                   "weights; needs calibration data"),
    "damping": Option(float, 1e-4, "with data=true: Sigma + damping * mean(diag Sigma) * I"),
}


def _register(method: str, doc: str, extra: dict[str, Option]) -> None:
    def run(graph: Graph, options: dict, context: PassContext) -> tuple[Graph, PassReport]:
        return factorize(method, graph, options, context)

    run.__doc__ = doc
    register(method, {**_COMMON, **extra})(run)


_register("svd", "Truncated SVD of Linear / Gemm / MatMul and 1x1 conv layers into two factors; "
                 "data=true: SVD-Sigma, the closed form on calibration data.", dict(_DATA))
_register("spatial_svd", "kxk conv -> (kh x 1) then (1 x kw) conv (Jaderberg / AIMET spatial SVD).", {})
# HOSVD is already close to the HOOI optimum; a few sweeps get the rest. Each sweep costs two full
# SVDs (tensorly's HOOI loop ignores its svd= argument; only the HOSVD init uses gram_svd)
_register("tucker2", "kxk conv -> 1x1 -> kxk core -> 1x1 (Tucker-2 by HOOI, Kim et al.); data=true: "
                     "Tucker-2-ALS-Sigma from the HOOI result.", {
    **_iterative(3, 1e-6), **_DATA,
    "data_iter_max": Option(int, 3, "data=true: Sigma-ALS sweeps after HOOI (each: a CG solve for U_S, U_T and "
                            "the core in closed form)")})
# ALS sweeps use line search (see als_einsum): 100 of them fit ResNet-18's 3x3 kernels at ratio 4 about
# as well as 500 plain sweeps, and keep CP-EPC of all its 3x3 convs within minutes on 2 cores.
_register("cp", "kxk conv -> 1x1 -> depthwise -> 1x1 (CP3) or with separable depthwise (CP4); ALS or EPC.", {
    **_iterative(100, 1e-8),
    "epc_iter_max": Option(int, 100, "method=epc: maximum error-preserving correction sweeps"),
    "variant": Option(str, "cp3", "cp3 (one depthwise kxk) or cp4 (kh x 1 then 1 x kw)"),
    "method": Option(str, "als", "als (CP-ALS) or epc (CPD-EPC, minimum sensitivity within the ALS error)"),
    **_DATA,
    "data_iter_max": Option(int, 10, "data=true: CP-ALS-Sigma sweeps after the weight-only CP (CG per factor)"),
})
_register("tt", "Linear / Gemm -> Tensor-Train matrix (TT-SVD), an einsum chain.", {})
