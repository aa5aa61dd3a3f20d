"""lowrank_sparse: a conv/linear layer -> a channel-pruned copy + a rank-L pair, summed (Ma et al. 2019).

Math: docs/methods.md#lowrank_sparse.

The math (ADMM on the layer's calibration patches) is in `decompose/lowrank_sparse.py`; this
module picks layers and targets, gathers each layer's data through the graph view, emits

    x -> Gather(kept channels) -> Conv(S_kept -> T, original kernel)  --+
    x -> Conv(S -> L, original kernel, no bias) -> 1x1 Conv(L -> T)   --+-> Add (one bias) -> ReLU

as one `ParallelSum` spec (the pruned channels leave the graph: that is the speed-up), and reports
what each replacement costs. A layer's data is recorded from the graph as it is when the layer's
turn comes, so later layers fit the inputs that earlier replacements produce.
"""
from __future__ import annotations

import math
import time
from typing import Iterator

import numpy as np

from tensorfold.ir.errors import PipelineError
from tensorfold.ir.graph import Graph, Layer
from tensorfold.ir.specs import Conv, Linear, ParallelSum, Spec, chain_cost, cost
from tensorfold.ir.torch_modules import run_specs

from ..decompose.lowrank_sparse import FitData, LowRankSparse, columns_of, lowrank_sparse as fit
from .factorize import selected_layers
from ..layer_data import SecondMoment, patch_width, patches, require_calibration, split_feeds
from ..measure import Feeds
from ..progress import progress_bar
from ..registry import Option, PassContext, register
from ..report import PassReport
from .replace import replace_and_record

DEFAULT_RATIO = 2.0


@register("lowrank_sparse", options={
    "rank": Option(int, None, "rank L of the low-rank pair (else from ratio=)"),
    "ratio": Option(float, None, "FLOPs of the layer / FLOPs of pruned conv + pair; sets L "
                                 f"(default {DEFAULT_RATIO:g})"),
    "sparsity": Option(float, 0.75, "fraction of input channels the sparse branch drops, in [0, 1]"),
    "lambda1": Option(float, 1.0, "group-lasso weight, relative: 1 sets lambda1/t each iteration so the shrinkage "
                                  "removes exactly the channels beyond the target; < 1 shrinks less"),
    "lambda2": Option(float, 1.0, "nuclear-norm weight, relative: 1 keeps exactly L singular values each iteration"),
    "penalty": Option(float, 10.0, "ADMM penalty t, relative to the loss's mean curvature (at 10 the residual "
                                   "settles within ~30 iterations on the digits CNN)"),
    "iters": Option(int, 30, "ADMM iterations"),
    "steps": Option(int, 3, "majorize-minimize steps per M update when a ReLU follows"),
    "refit": Option(bool, True, "refit the kept parameters on the fit data (least squares, then post-activation)"),
    "rows": Option(int, 8192, "patch rows sampled from the fit data for the post-activation loss"),
    "force": Option(bool, False, "replace even where FLOPs do not drop (e.g. to check sparsity=0 at full rank)"),
    "include": Option(str, "", "glob patterns on layer names, separated by |"),
    "exclude": Option(str, "", "glob patterns on layer names, separated by |"),
})
def lowrank_sparse(graph: Graph, options: dict, context: PassContext) -> tuple[Graph, PassReport]:
    """Unified low-rank + sparse: channel-pruned conv + rank-L pair, fitted by ADMM on calibration data."""
    feeds = require_calibration("lowrank_sparse", context.inputs.calibration)
    _check_options(options)
    fit_feeds, held_out = split_feeds(feeds)
    report = PassReport("lowrank_sparse")
    graph = graph.copy()
    order = {l.name: i for i, l in enumerate(graph.layers())}
    layers = _candidates(graph, options, report)
    with progress_bar("lowrank_sparse", total=len(layers), enabled=context.progress) as advance:
        for layer in layers:
            _replace_one(graph, graph.layer(layer.name), options, context, fit_feeds, held_out, report)
            advance()
    report.records.sort(key=lambda r: order.get(r.layer, -1))
    report.summary = {"fit / held-out calibration batches": f"{len(fit_feeds)} / {len(held_out)}"}
    return graph, report


def _check_options(options: dict) -> None:
    if options["rank"] is not None and options["ratio"] is not None:
        raise PipelineError("lowrank_sparse: give rank= or ratio=, not both")
    if options["rank"] is not None and options["rank"] < 0:
        raise PipelineError(f"lowrank_sparse: rank={options['rank']} must be >= 0")
    if options["ratio"] is not None and not options["ratio"] > 0:
        raise PipelineError(f"lowrank_sparse: ratio={options['ratio']} must be > 0")
    if not 0 <= options["sparsity"] <= 1:
        raise PipelineError(f"lowrank_sparse: sparsity={options['sparsity']} must lie in [0, 1]")
    for key in ("lambda1", "lambda2"):
        if options[key] < 0:
            raise PipelineError(f"lowrank_sparse: {key}={options[key]} must be >= 0")
    if not options["penalty"] > 0 or options["iters"] < 0 or options["steps"] < 1 or options["rows"] < 1:
        raise PipelineError("lowrank_sparse: penalty must be > 0, iters >= 0, steps >= 1 and rows >= 1")


def _candidates(graph: Graph, options: dict, report: PassReport) -> list[Layer]:
    """factorize's candidates (patterns, unreadable layers), less the layers this pass cannot split."""
    chosen = []
    for layer in selected_layers(graph, options, report):
        if (reason := _unsupported(layer.spec)) is not None:
            report.skip(layer.name, reason)
        else:
            chosen.append(layer)
    return chosen


def _unsupported(spec: Spec) -> str | None:
    if isinstance(spec, Conv) and spec.is_depthwise:
        return "depthwise conv: each output reads one channel, no channel to prune or rank to cut"
    if isinstance(spec, Conv) and spec.groups > 1:
        return f"grouped conv (groups={spec.groups}): a pruned input channel and the rank-L pair would cross groups"
    return None


# ---- structure: channels kept, rank, the emitted specs -----------------------------------------------
def _shape(spec: Conv | Linear) -> tuple[int, int, int]:
    """(T, S, g): outputs, input channels (features), taps per input channel."""
    if isinstance(spec, Linear):
        return spec.out_features, spec.in_features, 1
    return spec.out_channels, spec.in_channels, math.prod(spec.kernel_size)


def emitted_spec(spec: Conv | Linear, result: LowRankSparse) -> ParallelSum:
    """The ParallelSum of a fit: [Gather(kept) -> pruned layer] + [layer(S -> L) -> 1x1 (L -> T)], one bias."""
    t_out, channels, group = _shape(spec)
    branches, gathers = [], []
    if len(result.kept):
        weight = result.sparse[:, columns_of(result.kept, group)]
        branches.append([_like(spec, weight.reshape(t_out, len(result.kept), *_kernel(spec)), first=True)])
        gathers.append(None if len(result.kept) == channels else np.asarray(result.kept, np.int64))
    rank = result.first.shape[0]
    if rank:
        first = _like(spec, result.first.reshape(rank, channels, *_kernel(spec)), first=True)
        second = _like(spec, result.second.reshape(t_out, rank, *(1,) * len(_kernel(spec))), first=False)
        branches.append([first, second])
        gathers.append(None)
    bias = None if result.bias is None else np.asarray(result.bias, np.float32)
    return ParallelSum(branches, gathers, bias, axis=-1 if isinstance(spec, Linear) else 1)


def _kernel(spec: Conv | Linear) -> tuple[int, ...]:
    return () if isinstance(spec, Linear) else spec.kernel_size


def _like(spec: Conv | Linear, weight: np.ndarray, first: bool) -> Conv | Linear:
    """A layer like `spec` (its stride/padding/dilation when `first`, else a plain 1x1), without bias."""
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    if isinstance(spec, Linear):
        return Linear(weight, None)
    if first:
        return Conv(weight, None, tuple(spec.stride), tuple(spec.padding), tuple(spec.dilation))
    dims = spec.spatial_dims
    return Conv(weight, None, (1,) * dims, ((0, 0),) * dims, (1,) * dims)


def _layout(spec: Conv | Linear, keep: int, rank: int) -> ParallelSum:
    """Zero weights with the structure a fit at (keep, rank) emits: to cost it before fitting."""
    t_out, channels, group = _shape(spec)
    width = channels * group
    return emitted_spec(spec, LowRankSparse(np.zeros((t_out, width)), np.arange(keep), np.zeros((rank, width)),
                                            np.zeros((t_out, rank)), spec.bias, 0.0, (0.0, 0.0), 0.0))


def _targets(layer: Layer, options: dict) -> tuple[int, int, str | None]:
    """(channels kept by A, rank L of B, a note) for the layer's sparsity and rank/ratio."""
    spec = layer.spec
    t_out, channels, group = _shape(spec)
    keep = channels - int(round(options["sparsity"] * channels))
    bound = min(t_out, channels * group)
    notes = []
    if options["rank"] is not None:
        rank = min(options["rank"], bound)
        if options["rank"] > bound:
            notes.append(f"rank {options['rank']} exceeds this layer's maximum {bound}; clamped")
    else:
        ratio = options["ratio"] or DEFAULT_RATIO
        budget = cost(spec, layer.in_shape).flops / ratio
        sparse_flops = chain_cost([_layout(spec, keep, 0)], layer.in_shape).flops if keep else 0
        per_rank = chain_cost([_layout(spec, 0, 1)], layer.in_shape).flops
        rank = int(np.clip((budget - sparse_flops) // per_rank, 0, bound))
        if rank == 0 and keep:
            notes.append(f"the sparse branch alone takes {sparse_flops / max(budget, 1):.2f} of the FLOPs budget "
                         f"of ratio={ratio:g}: rank 0")
    if not keep and not rank:
        rank = 1
        notes.append("nothing fits the FLOPs budget: rank raised to 1")
    return keep, rank, "; ".join(notes) or None


# ---- data -----------------------------------------------------------------------------------------
def _inputs(graph: Graph, layer: Layer, feeds: Feeds) -> Iterator[np.ndarray]:
    """The layer's input on every feed (as its spec reads it: an ONNX Gemm with transA transposed)."""
    for feed in feeds:
        x = feed[layer.input] if layer.input in feed else graph.run(feed, record=[layer.input])[layer.input]
        yield x.T if layer.facts.get("transA") else x


def _fit_data(graph: Graph, layer: Layer, feeds: Feeds, rows: int, seed: int = 0) -> FitData:
    """Sigma over all fit patch rows, and about `rows` of them sampled evenly across the feeds."""
    rng = np.random.default_rng(seed)
    moment = SecondMoment(patch_width(layer.spec))
    sampled = []
    per_feed = math.ceil(rows / len(feeds))
    for x in _inputs(graph, layer, feeds):
        total = _row_count(layer.spec, x)
        for block in patches(layer.spec, x):
            moment.add(block)
            take = min(len(block), int(round(len(block) * min(1.0, per_feed / total))))
            sampled.append(block.numpy()[rng.choice(len(block), take, replace=False)])
    return FitData(moment.sigma(), np.concatenate(sampled))


def _row_count(spec: Conv | Linear, x: np.ndarray) -> int:
    if isinstance(spec, Linear):
        return max(1, x.size // spec.in_features)
    return math.prod(spec.out_shape(x.shape)[:1] + spec.out_shape(x.shape)[2:])


def _relu_follows(graph: Graph, layer: Layer) -> tuple[bool, str]:
    ops = graph.consumer_ops(layer.output)
    if ops and all(op == "Relu" for op in ops):
        return True, "post-activation: ||ReLU(Wx+b) - ReLU((A+B)x+b)|| (a ReLU consumes the output)"
    return False, (f"linear: ||Wx+b - ((A+B)x+b)|| (the output feeds {', '.join(sorted(set(ops))) or 'nothing'}, "
                   "not only a ReLU)")


def reconstruction_error(graph: Graph, layer: Layer, specs: list[Spec], feeds: Feeds, relu: bool) -> float | None:
    """||Y - Y'|| / ||Y|| pooled over `feeds`, Y the layer's response (after the ReLU when `relu`)."""
    if not feeds:
        return None
    num = den = 0.0
    for x in _inputs(graph, layer, feeds):
        before, after = run_specs([layer.spec], x), run_specs(specs, x)
        if relu:
            before, after = np.maximum(before, 0), np.maximum(after, 0)
        num += float(np.sum((before - after) ** 2))
        den += float(np.sum(before ** 2))
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


# ---- one layer ----------------------------------------------------------------------------------------
def _replace_one(graph: Graph, layer: Layer, options: dict, context: PassContext, fit_feeds: Feeds,
                 held_out: Feeds, report: PassReport) -> None:
    started = time.perf_counter()
    spec = layer.spec
    t_out, channels, group = _shape(spec)
    keep, rank, note = _targets(layer, options)
    before = cost(spec, layer.in_shape)
    planned = chain_cost([_layout(spec, keep, rank)], layer.in_shape)
    details = {"kept_channels": keep, "channels": channels, "kept_fraction": keep / channels, "rank": rank}
    if note:
        details["note"] = note
    if planned.flops >= before.flops and not options["force"]:
        report.skip(layer.name, f"keeping {keep}/{channels} input channels with rank {rank} would not reduce "
                    f"FLOPs ({planned.flops} >= {before.flops})", method="lowrank_sparse",
                    params_before=before.params, flops_before=before.flops, details=details)
        return
    relu, objective = _relu_follows(graph, layer)
    data = _fit_data(graph, layer, fit_feeds, options["rows"])
    weight = np.asarray(spec.weight, np.float64).reshape(t_out, channels * group)
    result = fit(weight, spec.bias, group, data, keep=keep, rank=rank, relu=relu, lambda1=options["lambda1"],
                 lambda2=options["lambda2"], penalty=options["penalty"], iters=options["iters"],
                 steps=options["steps"], refit=options["refit"])
    new = [emitted_spec(spec, result)]
    details.update({
        "objective": objective,
        "error_fit": reconstruction_error(graph, layer, new, fit_feeds, relu),
        "error_held_out": reconstruction_error(graph, layer, new, held_out, relu),
        "admm_residual": result.residual,
        "channels_from": result.channels_from,
        "weight_error": float(np.linalg.norm(weight - result.dense) / max(np.linalg.norm(weight), 1e-30)),
        "lambda1": result.lambdas[0], "lambda2": result.lambdas[1], "penalty": result.penalty,
        "refit": ("least squares on Sigma, then post-activation steps" if relu else "least squares on Sigma")
        if options["refit"] else "none",
        "fit_rows_sampled": len(data.rows),
    })
    replace_and_record(graph, layer, new, f"lowrank_sparse[keep {keep}/{channels}, L={rank}]", details, context,
                       report, started)
