"""ron: a chain of layers -> the reduced-order network of Gusak et al. ("Reduced-order modeling of deep neural
networks", 2021), an MLP that computes only some rows of every activation.

Calibration data through the network gives each activation z_k (the output of layer k after its batch norm,
activation and max-pool) on N samples. V_k holds its top R_k right singular vectors, S_k the P_k >= R_k rows a
rectangular maxvol picks from V_k. With s_k = S_k z_k, every z_k ~ V_k (S_k V_k)^+ s_k, so

    s_1 = psi(S_1 W_1 z_0 + b_1[S_1])
    s_k = psi(S_k W_k V_{k-1} (S_{k-1} V_{k-1})^+ s_{k-1} + b_k[S_k])
    out = W_K V_{K-1} (S_{K-1} V_{K-1})^+ s_{K-1} + b_K        (the closing layer: all its outputs)

and only the sampled rows are ever computed. A conv enters through its dense matrix (its response to
identity inputs, or to the basis V_{k-1}); a batch norm folds into the sampled rows; a max-pool with
kernel = stride becomes the max over the rows of each sampled window. The structure is read by
`ron_chain`, the bases and rows by `decompose/ron`; this module chooses where the reduced network starts
(where it saves the most FLOPs), builds it as Reshape / Linear / activation / group-max specs, measures it on
held-out calibration batches and splices it in, or says why not.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from tensorfold.ir.errors import PipelineError
from tensorfold.ir.graph import Graph
from tensorfold.ir.specs import Activation, Conv, GroupMax, Linear, Reshape, Spec, chain_cost
from tensorfold.ir.torch_modules import run_specs

from .bn_math import fold_after
from .decompose.ron import Basis, principal_basis, reconstruction, rect_maxvol, window_rows
from .layer_data import require_calibration, split_feeds
from .measure import Feeds
from .registry import Option, PassContext, register
from .report import LayerRecord, PassReport
from .ron_chain import Block, blocks_of, check_on_data, runs_of, without_bias

DEFAULT_ENERGY = 0.99
IDENTITY_VALUES = 1 << 22  # values of one chunk of identity inputs pushed through a conv (32 MB in float64)


@register("ron", options={
    "rank": Option(int, None, "R_k, the principal directions kept of every activation (else energy=)"),
    "energy": Option(float, None, "the smallest R_k keeping this fraction of each activation's squared norm on "
                                  f"calibration data, in (0, 1] (default {DEFAULT_ENERGY:g})"),
    "rows": Option(float, 2.0, "most rows sampled per activation, as a multiple of R_k (P_k <= rows * R_k)"),
    "tol": Option(float, 1.1, "rect_maxvol adds rows until every row of V (S V)^+ has norm <= tol (>= 1)"),
    "samples": Option(int, 0, "calibration samples the bases are fitted on (0: all but the held-out batches)"),
    "max_error": Option(float, 0.5, "refuse a conversion whose relative output error on held-out calibration "
                                    "batches exceeds this (inf: never refuse)"),
    "dense_limit": Option(int, 1 << 26, "largest dense matrix (outputs x inputs of one sample) a conv may enter "
                                        "through; default 2^26 entries, 256 MB in float32"),
    "force": Option(bool, False, "convert the whole chain, even where the reduced network does not save FLOPs"),
})
def ron(graph: Graph, options: dict, context: PassContext) -> tuple[Graph, PassReport]:
    """Reduced-order network (Gusak et al. 2021): a chain of Linear / small convs -> an MLP over maxvol-sampled rows.

    Handles ReLU and LeakyReLU, batch norm after a layer, max-pools with kernel = stride, flattens."""
    feeds = require_calibration("ron", context.inputs.calibration)
    _check_options(options)
    fit, held_out = split_feeds(feeds)
    graph = graph.copy()
    report = PassReport("ron", summary={"fit / held-out calibration batches": f"{len(fit)} / {len(held_out)}"})
    blocks = blocks_of(graph, options["dense_limit"])
    candidates = [b for run in runs_of(blocks) if len(run) > 1 for b in run]
    if candidates:
        check_on_data(graph, candidates, fit[0])
    handled: set[str] = set()
    for run in runs_of(blocks):
        if len(run) > 1:
            handled |= _convert_run(graph, run, options, fit, held_out or fit[-1:], report)
    for block in blocks:
        if block.layer.name not in handled:
            report.skip(block.layer.name, _lone_reason(block, blocks), method="ron",
                        params_before=block.layer.cost.params, flops_before=block.layer.cost.flops)
    position = {name: i for i, b in enumerate(blocks) for name in [b.layer.name] + ([b.bn.name] if b.bn else [])}
    report.records.sort(key=lambda r: position.get(r.layer, -1))  # stable: a batch norm stays after its layer
    return graph, report


def _check_options(options: dict) -> None:
    rank, energy = options["rank"], options["energy"]
    problems = [
        (rank is not None and energy is not None, "give rank= or energy=, not both"),
        (rank is not None and rank < 1, f"rank={rank} must be >= 1"),
        (energy is not None and not 0 < energy <= 1, f"energy={energy} must lie in (0, 1]"),
        (options["rows"] < 1 or options["tol"] < 1, f"rows={options['rows']} and tol={options['tol']} must be >= 1"),
        (options["samples"] < 0, f"samples={options['samples']} must be >= 0"),
        (options["dense_limit"] < 1, f"dense_limit={options['dense_limit']} must be >= 1"),
        (not options["max_error"] > 0, f"max_error={options['max_error']} must be > 0"),
    ]
    for bad, message in problems:
        if bad:
            raise PipelineError(f"ron: {message}")


def _lone_reason(block: Block, blocks: list[Block]) -> str:
    if block.unusable:
        return block.unusable
    after = block.stop or f"the layer after it, {block.next.name!r}, cannot be converted ({_unusable(block.next.name, blocks)})"
    return f"no chain of layers to reduce: {after}; and no convertible layer feeds it alone"


def _unusable(name: str, blocks: list[Block]) -> str:
    return next((b.unusable or "" for b in blocks if b.layer.name == name), "not a conv or Linear layer")


# ---- one run ---------------------------------------------------------------------------------------------
@dataclass
class Sampled:
    """One sampled activation: its basis, the rows kept, and the pre-activation rows computed for them."""

    block: Block
    basis: Basis
    rows: np.ndarray           # S_k, into the block's output
    pre_rows: np.ndarray       # rows of the layer's (batch-normed) output: S_k, or the windows of S_k member-major
    groups: int                # rows per sampled value (the pool window's size, 1 without a pool)


def _convert_run(graph: Graph, run: list[Block], options: dict, fit: Feeds, held_out: Feeds,
                 report: PassReport) -> set[str]:
    """Convert the cheapest tail of `run` or record why not; the names of the layers given a record."""
    started = time.perf_counter()
    sampled = _sample(graph, run[:-1], options, fit)
    start, before, after = _best_start(run, sampled, whole=options["force"])
    names = {b.layer.name for b in run}
    if after >= before and not options["force"]:
        for block, plan in zip(run, sampled + [None]):
            report.skip(block.layer.name, f"a reduced network over {run[0].layer.name}..{run[-1].layer.name} would "
                        f"not reduce FLOPs: at best {_flops(after)} against {_flops(before)}" + _shape_note(plan),
                        method="ron", params_before=block.layer.cost.params, flops_before=block.layer.cost.flops)
        return names
    region, plans = run[start:], sampled[start:]
    specs, segments = _build(region, plans)
    errors = _held_out_errors(graph, region, plans, specs, segments, held_out)
    output_error = errors[-1]
    if output_error > options["max_error"]:
        for block in run:
            report.skip(block.layer.name, f"the reduced network's relative output error on held-out calibration "
                        f"batches, {output_error:.3g}, exceeds max_error={options['max_error']:g}", method="ron",
                        params_before=block.layer.cost.params, flops_before=block.layer.cost.flops)
        return names
    for block in run[:start]:
        report.skip(block.layer.name, f"the reduced network starts after it, at {region[0].layer.name!r}: "
                    "starting here would save fewer FLOPs (its input is wider or its layer cheaper)", method="ron",
                    params_before=block.layer.cost.params, flops_before=block.layer.cost.flops)
    chain = [l.name for b in region for l in [b.layer] + ([b.bn] if b.bn is not None else [])]
    graph.replace(chain, specs)
    _record(report, region, plans, specs, segments, errors, time.perf_counter() - started)
    report.summary[f"{region[0].layer.name}..{region[-1].layer.name}"] = (
        f"relative output error {output_error:.4g} on held-out calibration batches; "
        f"FLOPs {_flops(before)} -> {_flops(after)}")
    return names


def _shape_note(plan: Sampled | None) -> str:
    if plan is None:
        return ""
    return f" (this activation: {plan.block.width} values -> {len(plan.rows)} rows, rank {plan.basis.rank})"


def _flops(value: int) -> str:
    return f"{value:,} FLOPs"


def _sample(graph: Graph, blocks: list[Block], options: dict, fit: Feeds) -> list[Sampled]:
    activations = _record_flat(graph, fit, [b.output for b in blocks], options["samples"])
    plans = []
    for block in blocks:
        z = activations[block.output]
        basis = _basis(block, z, options)
        rows = np.sort(rect_maxvol(basis.vectors, options["tol"], max(basis.rank, int(options["rows"] * basis.rank))))
        pool = block.pool
        if pool is None:
            plans.append(Sampled(block, basis, rows, rows, 1))
        else:
            pre = window_rows(rows, block.shapes[pool.input], pool.window)
            plans.append(Sampled(block, basis, rows, pre, math.prod(pool.window)))
    return plans


def _basis(block: Block, z: np.ndarray, options: dict) -> Basis:
    rank = options["rank"]
    if rank is not None and rank > block.width:
        raise PipelineError(f"ron: rank={rank} exceeds the width of layer {block.layer.name!r}'s activation "
                            f"({block.width} values); give rank <= {block.width} or energy=")
    if rank is not None and rank > len(z):
        raise PipelineError(f"ron: rank={rank} at layer {block.layer.name!r} needs at least {rank} calibration "
                            f"samples to fit, and {len(z)} were given (less the held-out batches)")
    energy = None if rank is not None else (options["energy"] or DEFAULT_ENERGY)
    return principal_basis(z, rank=rank, energy=energy)


def _record_flat(graph: Graph, feeds: Feeds, tensors: list[str], limit: int = 0) -> dict[str, np.ndarray]:
    """Every tensor in `tensors` on `feeds`, one row per sample (float64), at most `limit` samples (0: all)."""
    collected: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    count = 0
    for feed in feeds:
        if limit and count >= limit:
            break
        recorded = graph.run(feed, record=[t for t in tensors if t not in feed])
        for t in tensors:
            value = feed[t] if t in feed else recorded[t]
            collected[t].append(np.asarray(value, np.float64).reshape(len(value), -1))
        count += len(collected[tensors[0]][-1])
    return {t: np.concatenate(v)[:limit or None] for t, v in collected.items()}


def _best_start(run: list[Block], sampled: list[Sampled], whole: bool = False) -> tuple[int, int, int]:
    """(first block, FLOPs before, FLOPs after) of the tail of `run` whose reduction saves the most FLOPs
    (of all of `run` when `whole`)."""
    batch = run[0].layer.in_shape[0] or 1
    best = None
    for start in range(1 if whole else len(run) - 1):
        before = sum(_block_flops(b) for b in run[start:])
        macs = len(sampled[start].pre_rows) * math.prod(run[start].layer.in_shape[1:])
        macs += sum(len(p.pre_rows) * len(q.rows) for q, p in zip(sampled[start:-1], sampled[start + 1:]))
        macs += math.prod(run[-1].layer.out_shape[1:]) * len(sampled[-1].rows)
        candidate = (before - 2 * batch * macs, start, before, 2 * batch * macs)
        best = candidate if best is None or candidate[0] > best[0] else best
    return best[1], best[2], best[3]


def _block_flops(block: Block) -> int:
    return block.layer.cost.flops + (block.bn.cost.flops if block.bn is not None else 0)


# ---- the reduced network --------------------------------------------------------------------------------
def _affine(block: Block) -> Conv | Linear:
    """The layer with its batch norm folded in (exact up to float32 rounding)."""
    return fold_after(block.layer.spec, block.bn.spec) if block.bn is not None else block.layer.spec


def _response(block: Block, inputs: np.ndarray) -> np.ndarray:
    """W x for each row x of `inputs` (n x D_in), without the bias: (n x D_out), float64."""
    spec = without_bias(_affine(block))
    if isinstance(spec, Linear):
        return inputs @ np.asarray(spec.weight, np.float64).T
    shaped = inputs.reshape(len(inputs), *block.layer.in_shape[1:])
    return run_specs([spec], shaped).reshape(len(inputs), -1)


def _flat_bias(block: Block) -> np.ndarray:
    spec = _affine(block)
    out = block.layer.out_shape[1:]
    if spec.bias is None:
        return np.zeros(math.prod(out))
    return np.repeat(np.asarray(spec.bias, np.float64), math.prod(out[1:]))


def _rows_of_dense(block: Block, rows: np.ndarray) -> np.ndarray:
    """W[rows] (len(rows) x D_in), from identity inputs in chunks: only the kept rows are stored."""
    width = math.prod(block.layer.in_shape[1:])
    step = max(1, IDENTITY_VALUES // max(1, math.prod(block.layer.out_shape[1:])))
    columns = [_response(block, np.eye(width)[start:start + step])[:, rows] for start in range(0, width, step)]
    return np.concatenate(columns).T


def _build(region: list[Block], plans: list[Sampled]) -> tuple[list[Spec], list[int]]:
    """The specs of the reduced network, and where each block's specs end in that list."""
    first = region[0]
    specs: list[Spec] = []
    if len(first.layer.in_shape) > 2:
        specs.append(Reshape((math.prod(first.layer.in_shape[1:]),)))
    segments = []
    previous = None
    for block, plan in zip(region, plans + [None]):
        rows = plan.pre_rows if plan is not None else np.arange(math.prod(block.layer.out_shape[1:]))
        if previous is None:
            weight = _rows_of_dense(block, rows)
        else:
            basis = previous.basis.vectors  # S_k W_k V_{k-1} (S_{k-1} V_{k-1})^+, via W_k's response to V_{k-1}
            weight = _response(block, basis.T)[:, rows].T @ np.linalg.pinv(basis[previous.rows])
        specs.append(Linear(weight.astype(np.float32), _flat_bias(block)[rows].astype(np.float32)))
        if plan is not None:
            for step in block.steps:
                if step.kind == "activation":
                    specs.append(Activation(step.function, step.alpha))
                elif step.kind == "pool":
                    specs.append(GroupMax(plan.groups))
        elif len(block.layer.out_shape) > 2:
            specs.append(Reshape(tuple(block.layer.out_shape[1:])))
        segments.append(len(specs))
        previous = plan
    return specs, segments


def _held_out_errors(graph: Graph, region: list[Block], plans: list[Sampled], specs: list[Spec],
                     segments: list[int], feeds: Feeds) -> list[float]:
    """Per sampled activation ||z - V (S V)^+ s|| / ||z||, then the output's relative error; pooled over `feeds`."""
    tensors = list(dict.fromkeys([region[0].layer.input] + [p.block.output for p in plans]
                                 + [region[-1].affine_output]))
    recorded = _record_flat(graph, feeds, tensors)
    references = [recorded[p.block.output] for p in plans] + [recorded[region[-1].affine_output]]
    lifts = [reconstruction(p.basis.vectors, p.rows) for p in plans] + [None]
    value = recorded[region[0].layer.input].reshape(-1, *region[0].layer.in_shape[1:])
    errors, done = [], 0
    for reference, lift, end in zip(references, lifts, segments):
        value = run_specs(specs[done:end], value)  # one block at a time: each sampled activation is seen
        done = end
        estimate = value.reshape(len(value), -1) @ lift.T if lift is not None else value.reshape(len(value), -1)
        errors.append(_relative(reference, estimate))
    return errors


def _relative(reference: np.ndarray, estimate: np.ndarray) -> float:
    norm = float(np.linalg.norm(reference))
    diff = float(np.linalg.norm(reference - estimate))
    return diff / norm if norm > 0 else diff


def _record(report: PassReport, region: list[Block], plans: list[Sampled], specs: list[Spec], segments: list[int],
            errors: list[float], seconds: float) -> None:
    """One record per converted layer (D_k -> P_k, rank R_k, FLOPs, held-out error), one per folded batch norm."""
    shape = tuple(region[0].layer.in_shape)
    done = 0
    for i, (block, end) in enumerate(zip(region, segments)):
        cost = chain_cost(specs[done:end], shape)
        for spec in specs[done:end]:
            shape = spec.out_shape(shape)
        done = end
        before = block.layer.cost
        details: dict = {}
        if i < len(plans):
            plan = plans[i]
            method = f"ron[{block.width} -> {len(plan.rows)} rows, rank {plan.basis.rank}]"
            details.update({"width": block.width, "rows": len(plan.rows), "rank": plan.basis.rank,
                            "rows_computed": len(plan.pre_rows), "energy": plan.basis.energy,
                            "error_held_out": errors[i], "ops": [s.op for s in block.steps]})
        else:
            method = f"ron[closing: {math.prod(block.layer.out_shape[1:])} outputs from {len(plans[-1].rows)} rows]"
        report.add(LayerRecord(block.layer.name, "replaced", method=method, params_before=before.params,
                               params_after=cost.params, flops_before=before.flops, flops_after=cost.flops,
                               error_calibration=errors[i], details=details, seconds=seconds if i == 0 else 0.0))
        if block.bn is not None:
            report.add(LayerRecord(block.bn.name, "folded", method=f"into the rows of {block.layer.name}",
                                   params_before=block.bn.cost.params, flops_before=block.bn.cost.flops,
                                   details={"direction": "after"}))
