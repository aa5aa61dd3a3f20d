"""The data-driven side of the factorization passes (`svd`, `tucker2`, `cp` with data=true).

Per layer: Sigma of its input patches on the fit part of the calibration data (the pass's
input graph, recorded once for all layers), the Sigma-norm factors (passes/decompose/sigma.py),
and the report's evidence: the Sigma-error of the data-driven factors and of the weight-only
ones at the same ranks, both on held-out calibration batches, so a user sees what the data bought.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tensorfold.ir.errors import PipelineError
from tensorfold.ir.graph import Graph, Layer
from tensorfold.ir.specs import Conv, Linear, Spec

from .. import decompose as dec
from ..ranks import policy as rp
from ..decompose._common import group_kernels
from ..equivalent import dense_weight
from ..layer_data import SecondMoment, require_calibration, second_moments, split_feeds
from ..measure import Feeds
from ..report import PassReport


@dataclass
class LayerMoments:
    fit: SecondMoment
    held: SecondMoment | None  # None when the calibration data is a single sample


@dataclass
class DataRun:
    specs: list[Spec]            # the data-driven factors
    plain_specs: list[Spec]      # the weight-only factors at the same ranks (the start of the ALS methods)
    history: list[list[float]] = field(default_factory=list)  # per group: Sigma-error of each accepted iterate


def layer_moments(method: str, graph: Graph, layers: list[Layer], feeds: Feeds, progress: bool,
                  report: PassReport) -> dict[str, LayerMoments]:
    fit, held = split_feeds(require_calibration(method, feeds))
    fitted = second_moments(graph, layers, fit, f"{method}: calibration statistics", progress)
    held_out = second_moments(graph, layers, held, f"{method}: held-out statistics", progress) if held else {}
    for layer in layers:
        moment = fitted[layer.name]
        if moment.count < moment.width:
            report.warnings.append(f"{layer.name}: Sigma from {moment.count} patch rows for a width of {moment.width} "
                                   "is rank-deficient (damped); more calibration data gives a better fit")
    return {l.name: LayerMoments(fitted[l.name], held_out.get(l.name)) for l in layers}


def _group_sigmas(spec: Spec, sigma: np.ndarray) -> list[np.ndarray]:
    """Sigma block of each group (conv patches are channel-major, so groups are contiguous blocks)."""
    if not isinstance(spec, Conv) or spec.groups == 1:
        return [sigma]
    width = int(np.prod(spec.weight.shape[1:]))
    return [sigma[g * width:(g + 1) * width, g * width:(g + 1) * width] for g in range(spec.groups)]


def _group_matrices(spec: Spec) -> list[np.ndarray]:
    if isinstance(spec, Linear):
        return [np.asarray(spec.weight, np.float64)]
    return [k.reshape(k.shape[0], -1) for k in group_kernels(spec)]


def sigma_energy_ranks(tau: float, spec: Spec, moment: SecondMoment) -> rp.RankChoice:
    """svd's energy policy over the output energy (eigenvalues of W Sigma W^T), summed over groups."""
    if not 0 < tau <= 1:
        raise PipelineError(f"energy must be in (0, 1], got {tau}")
    reason = dec.check_svd(spec)
    if reason is not None:
        raise dec.NotFactorable(reason)
    sigmas = _group_sigmas(spec, moment.sigma())
    spectra = [dec.sigma_spectrum(w, s) for w, s in zip(_group_matrices(spec), sigmas)]
    energies = np.sum([s[:min(len(x) for x in spectra)] for s in spectra], axis=0)
    kept = np.cumsum(energies) / max(float(np.sum(energies)), 1e-300)
    rank = min(int(np.searchsorted(kept, tau * (1 - 1e-12))) + 1, len(energies))
    floor = rp.min_ranks("svd", spec)[0]
    note = f"svd: rank {rank} raised to the minimum {floor}" if rank < floor else None
    choice = rp.clamp_ranks("svd", spec, (max(rank, floor),))
    return rp.RankChoice(choice.ranks, "; ".join(n for n in (note, choice.note) if n) or None)


def data_specs(method: str, key: str, spec: Spec, ranks: tuple[int, ...], options: dict,
               moments: LayerMoments) -> DataRun:
    """The Sigma-norm factor specs of `spec` at `ranks`, with the weight-only ones beside them."""
    sigmas = _group_sigmas(spec, moments.fit.sigma(options["damping"]))
    if method == "svd":
        plain = dec.svd_specs(spec, ranks[0])
        pairs = [dec.svd_sigma_factors(w, ranks[0], s) for w, s in zip(_group_matrices(spec), sigmas)]
        return DataRun(dec.svd_realise(spec, [p[0] for p in pairs], [p[1] for p in pairs]), plain)
    if method == "tucker2":
        dec.tucker2_layout(spec, tuple(ranks))  # checks the layer and the ranks
        kernels = group_kernels(spec)
        starts = [dec.tucker2_factors(k, tuple(ranks), options["n_iter_max"], options["tol"]) for k in kernels]
        histories: list[list[float]] = [[] for _ in kernels]
        refined = [dec.tucker2_sigma_factors(k, tuple(ranks), s, start, options["data_iter_max"], h)
                   for k, s, start, h in zip(kernels, sigmas, starts, histories)]
        return DataRun(dec.tucker2_realise(spec, refined), dec.tucker2_realise(spec, starts), histories)
    if method == "cp":
        variant = key
        extra = {"epc_iter_max": options["epc_iter_max"]} if options["method"] == "epc" else {}
        starts = dec.cp_factors(spec, ranks[0], variant, method=options["method"], n_iter_max=options["n_iter_max"],
                                tol=options["tol"], **extra)
        shape = dec.cp_kernel_shape(spec, variant)
        histories = [[] for _ in starts]
        refined = [dec.cp_sigma_factors(k.reshape(shape), s, start, options["data_iter_max"], h)
                   for k, s, start, h in zip(group_kernels(spec), sigmas, starts, histories)]
        return DataRun(dec.cp_realise(spec, refined, variant), dec.cp_realise(spec, starts, variant), histories)
    raise dec.NotFactorable(f"{method} has no data-driven variant")


def data_error(spec: Spec, specs: list[Spec], moment: SecondMoment) -> float:
    """Relative error E||(W - W~)x||^2 / E||W x||^2 (square-rooted) under `moment`'s Sigma."""
    reference = dense_weight([spec])
    return dec.sigma_error(reference.reshape(reference.shape[0], -1), dense_weight(specs), moment.sigma())


def data_details(spec: Spec, run: DataRun, moments: LayerMoments) -> dict[str, Any]:
    held = moments.held or moments.fit
    where = "held-out calibration batches" if moments.held else "the calibration data (too little to hold any out)"
    details: dict[str, Any] = {
        "objective": "data: E||(W - W~) x||^2 over the layer's calibration input patches (Sigma-norm)",
        "data_error_heldout": data_error(spec, run.specs, held),
        "weight_only_error_heldout": data_error(spec, run.plain_specs, held),
        "heldout": where,
        "calibration_rows": moments.fit.count,
    }
    if run.history:
        details["sigma_error_history"] = [[round(v, 6) for v in h] for h in run.history]
    return details
