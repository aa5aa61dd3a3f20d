"""musco: multi-stage compression (Gusak et al., ICCVW 2019) — factorize, fine-tune, then in each
further stage recompress only the inner part of every factorized layer (passes/decompose/recompress.py)
at the rank its policy gives now, merge, and fine-tune again; until the FLOPs target is met or
the ranks stop moving (EVBMF weakened by 0.8 finds less and less to cut).

Ranks per stage: rank=evbmf(weaken=w) reads EVBMF on the core's unfoldings (Tucker-2), on the
second factor (SVD); ratio=r divides the parameters by r each stage (CP: R -> R/r). CP has no
spectrum for EVBMF, so musco(method=cp) takes ratio=.
"""
from __future__ import annotations

import time
from typing import Any

from tensorfold.ir.errors import PipelineError
from tensorfold.ir.graph import Graph
from tensorfold.ir.specs import Linear, Spec, chain_cost

from .. import decompose as dec
from ..ranks import policy as rp
from ..decompose import recompress as rc
from ..substitute.factorize import factorize
from ..measure import layer_error
from ..registry import Option, PassContext, get, register
from ..report import LayerRecord, PassReport
from .finetune import finetune_graph, parse_options

CHAIN_LENGTH = {"tucker2": 3, "svd": 2, "cp3": 3, "cp4": 4}

OPTIONS = {
    "method": Option(str, "tucker2", "tucker2, svd or cp"),
    "rank": Option(str, None, "evbmf or evbmf(weaken=w) (default evbmf(weaken=0.8), as musco), each stage"),
    "ratio": Option(float, None, "instead of rank: divide each layer's parameters by this each stage"),
    "stages": Option(int, 3, "at most this many compress + fine-tune stages"),
    "until": Option(str, "stable", "stable (stop when no rank moves) or flops:<f> (stop at f x the input's FLOPs)"),
    "finetune": Option(str, "epochs=1", "finetune options for every stage, e.g. (epochs=2, lr=0.0005)"),
    "variant": Option(str, "cp3", "method=cp: cp3 or cp4"),
    "include": Option(str, "", "glob patterns on layer names, separated by |"),
    "exclude": Option(str, "", "glob patterns on layer names, separated by |"),
}


@register("musco", OPTIONS)
def musco(graph: Graph, options: dict, context: PassContext) -> tuple[Graph, PassReport]:
    """Multi-stage: factorize, fine-tune, recompress the cores and merge, fine-tune... (MUSCO)."""
    if context.training is None:
        raise PipelineError("musco fine-tunes after every stage and needs labelled training data: "
                            "tf.compress(..., train_data=...) or --train-data DIR|TASK")
    method, key, policy, target = _settings(options)
    tune_options = parse_options(options["finetune"])
    teacher = context.teacher if tune_options["distill"] else None
    report = PassReport("musco")
    start_flops = graph.layer_cost().flops
    stages: list[dict[str, Any]] = []

    # stage 1: the ordinary factorization pass at the same policy
    first_options = get(method).resolve({**_policy_option(options), "include": options["include"],
                                         "exclude": options["exclude"],
                                         **({"variant": options["variant"]} if method == "cp" else {})})
    before_names = {l.name for l in graph.layers()}
    current, first = factorize(method, graph, first_options, context)
    report.records += first.records
    report.warnings += first.warnings
    chains = _new_chains(graph, current, before_names, first, CHAIN_LENGTH[key])
    ranks = {origin: _ranks(key, [current.layer(n).spec for n in names]) for origin, names in chains.items()}
    current = _tune_stage(1, current, context, tune_options, teacher, stages, ranks, start_flops, report)

    for stage in range(2, options["stages"] + 1):
        if _reached(current, start_flops, target) or not chains:
            break
        proposals = []
        for origin, names in list(chains.items()):
            layers = [current.layer(n) for n in names]
            specs = [l.spec for l in layers]
            try:
                new_ranks = _next_ranks(key, specs, policy)
                if new_ranks == _ranks(key, specs):
                    continue
                new_specs = _recompress(key, specs, new_ranks, options)
            except dec.NotFactorable as e:
                report.skip(origin, f"stage {stage}: {e.reason}")
                del chains[origin]
                continue
            before, after = chain_cost(specs, layers[0].in_shape), chain_cost(new_specs, layers[0].in_shape)
            if after.flops < before.flops:
                proposals.append((origin, names, layers, new_ranks, new_specs, before, after))
        if target is not None:
            # toward a FLOPs target: the largest savings first, and stop as soon as it is met, so the
            # last stage does not overshoot by a whole stage's worth of rank cuts
            proposals.sort(key=lambda p: p[5].flops - p[6].flops, reverse=True)
        moved = 0
        for origin, names, layers, new_ranks, new_specs, before, after in proposals:
            if _reached(current, start_flops, target):
                report.warnings.append(f"stage {stage}: FLOPs target met after recompressing {moved} of "
                                       f"{len(proposals)} layers; the others keep their ranks")
                break
            started = time.perf_counter()
            err_random, err_calibration = layer_error(current, layers, new_specs, context.inputs)
            names_before = {l.name for l in current.layers()}
            current.replace(names, new_specs)
            chains[origin] = [l.name for l in current.layers() if l.name not in names_before]
            ranks[origin] = new_ranks
            moved += 1
            report.add(LayerRecord(origin, "recompressed", method=f"stage {stage}: {key}{list(new_ranks)}",
                                   params_before=before.params, params_after=after.params, flops_before=before.flops,
                                   flops_after=after.flops, error_random=err_random, error_calibration=err_calibration,
                                   seconds=time.perf_counter() - started))
        if not moved:
            report.warnings.append(f"stage {stage}: no rank moved (stable); stopped")
            break
        current = _tune_stage(stage, current, context, tune_options, teacher, stages, ranks, start_flops, report)
    if target is not None and not _reached(current, start_flops, target):
        report.warnings.append(f"FLOPs target {target:g} x not reached after {len(stages)} stage(s): at "
                               f"{current.layer_cost().flops / max(start_flops, 1):.3f} x")
    report.summary = {"stages": stages, "final ranks": {k: list(v) for k, v in ranks.items()}}
    return current, report


def _settings(options: dict) -> tuple[str, str, rp.RankPolicy, float | None]:
    method = options["method"]
    if method not in ("tucker2", "svd", "cp"):
        raise PipelineError(f"musco: method={method!r}; expected tucker2, svd or cp")
    if options["variant"] not in ("cp3", "cp4"):
        raise PipelineError(f"musco: variant={options['variant']!r}; expected cp3 or cp4")
    key = options["variant"] if method == "cp" else method
    if options["rank"] and options["ratio"]:
        raise PipelineError("musco: give rank= or ratio=, not both")
    if options["ratio"] is not None:
        if not options["ratio"] > 1:
            raise PipelineError(f"musco: ratio={options['ratio']} must exceed 1")
        policy: rp.RankPolicy = rp.Ratio(options["ratio"])
    else:
        policy = rp.parse_rank_policy(options["rank"] or "evbmf(weaken=0.8)")
        if not isinstance(policy, rp.Evbmf):
            raise PipelineError(f"musco: rank={options['rank']!r}; a stage policy is evbmf(weaken=w) or ratio=r "
                                "(a fixed rank cannot shrink from stage to stage)")
        if method == "cp":
            raise PipelineError("musco(method=cp): CP has no spectrum for EVBMF; give ratio= (e.g. ratio=2)")
    if options["stages"] < 1:
        raise PipelineError(f"musco: stages={options['stages']} must be at least 1")
    until = options["until"]
    target = None
    if until != "stable":
        kind, _, value = until.partition(":")
        try:
            target = float(value)
        except ValueError:
            target = None
        if kind != "flops" or target is None or not 0 < target < 1:
            raise PipelineError(f"musco: until={until!r}; expected stable or flops:<fraction in (0, 1)>")
    return method, key, policy, target


def _policy_option(options: dict) -> dict[str, Any]:
    if options["ratio"] is not None:
        return {"ratio": options["ratio"]}
    return {"rank": options["rank"] or "evbmf(weaken=0.8)"}


def _new_chains(before: Graph, after: Graph, before_names: set[str], report: PassReport,
                length: int) -> dict[str, list[str]]:
    """Replaced layer -> the names of its factor layers in `after` (they sit where it sat, in order)."""
    order = {l.name: i for i, l in enumerate(before.layers())}
    replaced = sorted((r.layer for r in report.changed), key=lambda name: order[name])
    new = [l.name for l in after.layers() if l.name not in before_names]
    if len(new) != length * len(replaced):
        raise PipelineError(f"musco: expected {length} factor layers for each of {len(replaced)} replaced layers, "
                            f"found {len(new)}")
    return {name: new[i * length:(i + 1) * length] for i, name in enumerate(replaced)}


def _ranks(key: str, specs: list[Spec]) -> tuple[int, ...]:
    if key == "tucker2":
        core = specs[1].weight
        return int(core.shape[0]), int(core.shape[1])
    return (int(specs[0].weight.shape[0]),)


def _next_ranks(key: str, specs: list[Spec], policy: rp.RankPolicy) -> tuple[int, ...]:
    """The ranks the policy gives this stage: read on the core (Tucker-2) or the second factor (SVD)."""
    if key == "tucker2":
        return rp.select_ranks(policy, "tucker2", rc.tucker2_core(specs)).ranks
    if key == "svd":
        rc.svd_pair(specs)
        current = int(specs[0].weight.shape[0])
        if isinstance(policy, rp.Ratio):
            return (max(min(int(current / policy.rate), current), 1),)
        second = specs[1].weight
        return (min(rp.select_ranks(policy, "svd", Linear(second.reshape(second.shape[0], -1))).ranks[0], current),)
    current = rc.cp_rank(specs)
    return (max(int(current / policy.rate), 2),)


def _recompress(key: str, specs: list[Spec], ranks: tuple[int, ...], options: dict) -> list[Spec]:
    if key == "tucker2":
        return rc.recompress_tucker2(specs, ranks)
    if key == "svd":
        return rc.recompress_svd(specs, ranks[0])
    return rc.recompress_cp(specs, ranks[0], key)


def _reached(graph: Graph, start_flops: int, target: float | None) -> bool:
    return target is not None and graph.layer_cost().flops <= target * start_flops


def _tune_stage(stage: int, graph: Graph, context: PassContext, tune_options: dict, teacher: Graph | None,
                stages: list[dict], ranks: dict, start_flops: int, report: PassReport) -> Graph:
    tuned, tune_report = finetune_graph(graph, context.training, tune_options, teacher, context.progress,
                                        label=f"musco stage {stage} finetune")
    metric = "accuracy" if context.training.classification else "MSE"
    flops = tuned.layer_cost().flops
    stages.append({"stage": stage, "flops": flops, "flops_x": round(start_flops / max(flops, 1), 3),
                   "params": tuned.total_params(), "ranks": {k: list(v) for k, v in ranks.items()},
                   "heldout before finetune": tune_report.summary[f"held-out {metric} before"],
                   "heldout after finetune": tune_report.summary[f"held-out {metric} after"],
                   "finetune seconds": tune_report.summary["training seconds"]})
    if "lr back-offs" in tune_report.summary:
        stages[-1]["finetune lr"] = tune_report.summary["lr"]
    report.warnings += [w for w in tune_report.warnings if w not in report.warnings]
    return tuned
