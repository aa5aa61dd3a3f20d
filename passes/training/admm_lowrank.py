"""admm_lowrank: rank-constrained training by ADMM (Diao, Han, Chen, "A workflow for high performance
and high fidelity neural network compression"), then the layers become their factors.

For the chosen Linear layers W, with Z the low-rank copy and U the scaled dual:
  W-step: `epochs_per_iter` epochs of the task loss + rho/2 * sum ||W - Z + U||^2 (all weights train)
  Z-step: Z = projection of W + U onto rank <= r (truncated SVD) or TT ranks <= r (TT rounding)
  dual:   U += W - Z; then rho grows by `rho_growth` (U rescaled to match), which drives W to Z.
Finally W := Z, each layer becomes two Linears (svd, exact: Z has rank r) or a TT chain (tt), and a
short fine-tune (`finetune=` options) trains the factors with the structure fixed. The report keeps
each layer's primal residual ||W - Z|| / ||W|| per iteration.

data=true (svd) measures the constraint on the layer's inputs instead of on its weights: with Sigma
= E[x x^T] of the layer's inputs on calibration data, the penalty is rho/2 * tr(D Sigma D^T) for
D = W - Z + U (||D x||^2 on average), and the Z-step, its exact minimiser over rank <= r, is the
SVD-Sigma projection U_r U_r^T V of V = W + U (U_r: top eigenvectors of V Sigma V^T; Kalle et al.'s
closed form, docs/methods.md#data-driven-factorization). Ranks can then follow the data per layer
(`energy=`: the output energy E||W x||^2 kept). In a coordinate MLP the inputs of the deep layers
span few directions (their pre-activations are nearly rank 40 of 256) while the first layers' do
not, so one rank for all layers spends it where it buys nothing.
"""
from __future__ import annotations

import time
import numpy as np
import torch

from tensorfold.ir.errors import PipelineError
from tensorfold.ir.graph import Graph, Layer
from tensorfold.ir.specs import Linear, Spec, chain_cost

from .. import decompose as dec
from ..ranks import policy as rp
from ..decompose.projection import project_rank, project_rank_sigma, project_tt
from ..layer_data import require_calibration, second_moments
from ..substitute.factorize import selected_layers
from ..registry import Option, PassContext, register
from ..report import LayerRecord, PassReport
from .finetune import finetune_graph, parse_options
from .loop import FitOptions, fit, score
from .trainable import trainable

OPTIONS = {
    "rank": Option(str, None, "the rank r (svd) or every inner TT rank (tt)"),
    "ratio": Option(float, None, "instead of rank: parameters divided by this per layer (default 4)"),
    "energy": Option(float, None, "instead of rank: per layer the least rank keeping this fraction of the output "
                     "energy E||W x||^2 on calibration data (needs data=true)"),
    "data": Option(bool, False, "svd: penalty and projection in the Sigma-norm of the layer's calibration inputs"),
    "damping": Option(float, 1e-4, "with data=true: Sigma + damping * mean(diag Sigma) * I"),
    "format": Option(str, "svd", "svd (two Linears) or tt (a Tensor-Train chain)"),
    "rho": Option(float, 1e-3, "initial ADMM penalty"),
    "rho_growth": Option(float, 1.5, "rho is multiplied by this after every iteration"),
    "iters": Option(int, 8, "ADMM iterations (W-step, Z-step, dual step)"),
    "epochs_per_iter": Option(int, 1, "training epochs in each W-step"),
    "lr": Option(float, 1e-3, "learning rate of the W-steps (constant)"),
    "batch": Option(int, 256, "batch size of the W-steps"),
    "finetune": Option(str, "epochs=2, distill=false", "finetune options after W := Z (same batch unless given)"),
    "include": Option(str, "", "glob patterns on layer names, separated by |"),
    "exclude": Option(str, "", "glob patterns on layer names, separated by |"),
    "force": Option(bool, False, "factor layers even where it does not reduce params and FLOPs"),
}


@register("admm_lowrank", OPTIONS)
def admm_lowrank(graph: Graph, options: dict, context: PassContext) -> tuple[Graph, PassReport]:
    """Rank-constrained ADMM on the task loss, then W := Z as svd / tt factors and a short fine-tune."""
    if context.training is None:
        raise PipelineError("admm_lowrank trains on the task's loss and needs labelled training data: "
                            "tf.compress(..., train_data=<task | (inputs, targets) | DataLoader>) or --train-data")
    fmt = options["format"]
    if fmt not in ("svd", "tt"):
        raise PipelineError(f"admm_lowrank: format={fmt!r}; expected svd or tt")
    if options["iters"] < 1 or options["epochs_per_iter"] < 1 or not options["rho"] > 0 \
            or not options["rho_growth"] >= 1:
        raise PipelineError("admm_lowrank: iters and epochs_per_iter must be >= 1, rho > 0 and rho_growth >= 1")
    if options["data"] and fmt != "svd":
        raise PipelineError("admm_lowrank: data=true projects in the Sigma-norm by SVD; it needs format=svd")
    if options.get("energy") not in (None, "") and not options["data"]:
        raise PipelineError("admm_lowrank: energy= keeps output energy on calibration data; give data=true with it")
    report = PassReport("admm_lowrank")
    candidates = selected_layers(graph, options, report)
    sigmas = _input_sigmas(graph, candidates, context, options) if options["data"] else {}
    targets = _targets(candidates, options, report, sigmas)
    if not targets:
        report.warnings.append("no Linear layer to constrain: graph returned unchanged")
        return graph, report

    view = trainable(graph, "admm_lowrank")
    weights = {name: _weight_parameter(view, layer) for name, (layer, _) in targets.items()}
    data = context.training
    train, heldout = data.split(0.1, 0)
    fit_options = FitOptions(epochs=options["epochs_per_iter"], lr=options["lr"], batch=options["batch"],
                             schedule="constant")
    project = {name: _projector(layer.spec, ranks, fmt, sigmas.get(name)) for name, (layer, ranks) in targets.items()}
    # the penalty's metric: Sigma scaled to a mean eigenvalue of 1 (rho means the same as without data), or I
    metric = {name: None if name not in sigmas else
              torch.from_numpy(sigmas[name] / (np.trace(sigmas[name]) / len(sigmas[name]))).float() for name in targets}
    z = {name: torch.from_numpy(project[name](w.detach().numpy().astype(np.float64)).astype(np.float32))
         for name, w in weights.items()}
    u = {name: torch.zeros_like(w) for name, w in weights.items()}
    residuals: dict[str, list[float]] = {name: [] for name in weights}
    before = score(view.module.eval(), heldout)
    rho = options["rho"]
    started = time.perf_counter()
    parameters = [p for p in view.module.parameters() if p.requires_grad]
    for iteration in range(options["iters"]):
        penalty_rho = rho

        def penalty() -> torch.Tensor:
            total = 0.0
            for n in weights:
                d = weights[n] - z[n] + u[n]
                total = total + 0.5 * penalty_rho * (torch.sum(d * d) if metric[n] is None else torch.sum((d @ metric[n]) * d))
            return total

        fit(view.module, parameters, train, heldout, fit_options, label=f"admm_lowrank iteration {iteration + 1}",
            progress=context.progress, penalty=penalty)
        with torch.no_grad():
            for name, w in weights.items():
                z[name] = torch.from_numpy(project[name]((w + u[name]).numpy().astype(np.float64)).astype(np.float32))
                u[name] += w - z[name]
                residuals[name].append(float(torch.linalg.norm(w - z[name]) / max(float(torch.linalg.norm(w)), 1e-30)))
        grown = rho * options["rho_growth"]
        for name in u:  # scaled dual: U = Y / rho, so it shrinks when rho grows
            u[name] *= rho / grown
        rho = grown
    with torch.no_grad():
        for name, w in weights.items():
            w.copy_(z[name])
    admm_seconds = time.perf_counter() - started
    after_admm = score(view.module.eval(), heldout)
    result = view.finish()

    for name, (layer, ranks) in targets.items():
        current = result.layer(layer.name)
        specs = _factors(current.spec, ranks, fmt)
        cost_before, cost_after = chain_cost([current.spec], current.in_shape), chain_cost(specs, current.in_shape)
        result.replace([layer.name], specs)
        report.add(LayerRecord(name, "replaced", method=f"admm {fmt}{list(ranks)}",
                               params_before=cost_before.params, params_after=cost_after.params,
                               flops_before=cost_before.flops, flops_after=cost_after.flops,
                               details={"ranks": list(ranks), "primal_residual": [round(r, 6) for r in residuals[name]]}))
    tune_options = parse_options(options["finetune"], batch=options["batch"])
    tuned, tune_report = finetune_graph(result, data, tune_options, None, context.progress,
                                        label="admm_lowrank finetune")
    metric = "accuracy" if data.classification else "MSE"
    report.summary = {
        f"held-out {metric} before": round(before, 6),
        f"held-out {metric} after ADMM (W := Z)": round(after_admm, 6),
        f"held-out {metric} after fine-tuning": tune_report.summary[f"held-out {metric} after"],
        "ADMM seconds": round(admm_seconds, 1),
        "fine-tuning seconds": tune_report.summary["training seconds"],
        "final rho": rho,
    }
    report.warnings += tune_report.warnings
    return tuned, report


def _input_sigmas(graph: Graph, layers: list[Layer], context: PassContext, options: dict) -> dict[str, np.ndarray]:
    """E[x x^T] (damped) of every Linear layer's input on the calibration data."""
    linear = [layer for layer in layers if isinstance(layer.spec, Linear)]
    feeds = require_calibration("admm_lowrank(data=true)", context.inputs.calibration)
    moments = second_moments(graph, linear, feeds, "admm_lowrank: calibration statistics", context.progress)
    return {name: moment.sigma(options["damping"]) for name, moment in moments.items()}


def _targets(layers: list[Layer], options: dict, report: PassReport,
             sigmas: dict[str, np.ndarray]) -> dict[str, tuple[Layer, tuple[int, ...]]]:
    """Linear layers to constrain, with their ranks; the rest skipped with the reason."""
    method = "svd" if options["format"] == "svd" else "tt"
    given = [k for k in ("rank", "ratio", "energy") if options.get(k) not in (None, "")]
    if len(given) > 1:
        raise PipelineError(f"admm_lowrank: give one of rank=, ratio= and energy=, not {' and '.join(given)}")
    energy = options.get("energy") if given == ["energy"] else None
    if energy is not None and not 0 < energy <= 1:
        raise PipelineError(f"admm_lowrank: energy must be in (0, 1], got {energy}")
    policy = rp.parse_rank_policy(f"rank={options['rank']}" if options.get("rank") not in (None, "")
                                  else f"ratio={options['ratio'] or 4}")
    chosen = {}
    for layer in layers:
        if not isinstance(layer.spec, Linear):
            report.skip(layer.name, "admm_lowrank constrains Linear layers")
            continue
        reason = rp.METHODS[method].check(layer.spec)
        if reason is not None:
            report.skip(layer.name, reason)
            continue
        try:
            ranks = (_energy_rank(layer.spec, sigmas[layer.name], energy) if energy is not None
                     else rp.select_ranks(policy, method, layer.spec).ranks)
        except dec.NotFactorable as e:
            report.skip(layer.name, e.reason)
            continue
        if not options["force"] and not rp.factorization_pays(method, layer.spec, ranks, layer.in_shape):
            report.skip(layer.name, f"rank {list(ranks)} would not reduce both params and FLOPs")
            continue
        chosen[layer.name] = (layer, tuple(ranks))
    return chosen


def _weight_parameter(view, layer: Layer) -> torch.nn.Parameter:
    shape = tuple(layer.spec.weight.shape)
    found = [p for p in view.layer_parameters(layer.name) if tuple(p.shape) == shape]
    if len(found) != 1:
        raise PipelineError(f"admm_lowrank: layer {layer.name!r}: cannot find its {shape} weight among the "
                            "trainable parameters")
    return found[0]


def _energy_rank(spec: Linear, sigma: np.ndarray, energy: float) -> tuple[int]:
    """The least rank whose SVD-Sigma projection keeps `energy` of E||W x||^2."""
    spectrum = dec.sigma_spectrum(np.asarray(spec.weight, np.float64), sigma)
    kept = np.cumsum(spectrum) / max(float(np.sum(spectrum)), 1e-300)
    return (min(int(np.searchsorted(kept, energy * (1 - 1e-12))) + 1, len(spectrum)),)


def _projector(spec: Linear, ranks: tuple[int, ...], fmt: str, sigma: np.ndarray | None):
    if sigma is not None:
        return lambda w: project_rank_sigma(w, ranks[0], sigma)
    if fmt == "svd":
        return lambda w: project_rank(w, ranks[0])
    in_modes, out_modes = dec.tt_modes(spec.in_features, spec.out_features)
    return lambda w: project_tt(w, ranks, in_modes, out_modes)


def _factors(spec: Spec, ranks: tuple[int, ...], fmt: str) -> list[Spec]:
    if fmt == "svd":
        return dec.svd_specs(spec, ranks[0])
    return [dec.tt_spec(spec, ranks)]
