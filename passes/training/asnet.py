"""asnet: the active-subspace network of Cui, Garcia et al. (SIMODS 2020).

Cut the network after one layer; project that layer's output z on its active subspace V_r (the top
eigenvectors of the covariance of the loss gradient dL/dz over training samples,
passes/decompose/active_subspace.py); replace everything after the cut by a small head on the r
projected features, trained on the task's labels (and, by default, the original's outputs as soft
targets). The head is an MLP (r -> hidden -> classes, ReLU), not the paper's polynomial-chaos
expansion: the graph view has no polynomial layer, and an MLP head trains with the same loop as every
other training pass. The result is an ordinary graph: [flatten] -> Linear(V_r^T) -> head.

The part after the cut must be a chain (conv / Linear layers with batch norm, ReLU / LeakyReLU,
k-window max-pools and flattens between them, as `ron` reads them: passes/ron_chain.py) ending at the
graph's output; anything else (a residual, a branch) is refused with where the chain breaks.
"""
from __future__ import annotations

import math
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from tensorfold.ir.errors import PipelineError
from tensorfold.ir.graph import GRAPH_OUTPUT, Graph
from tensorfold.ir.specs import Activation, Cost, Linear, Reshape, Spec, chain_cost
from tensorfold.ir.torch_modules import ReshapeModule, to_module

from ..decompose.active_subspace import active_subspace
from ..registry import Option, PassContext, register
from ..report import LayerRecord, PassReport
from ..ron_chain import Block, blocks_of, check_on_data
from .finetune import graph_outputs
from .loop import FitOptions, Labelled, fit

OPTIONS = {
    "layer": Option(str, "", "the conv / Linear layer after which to cut (its batch norm, activation, pool and "
                    "flatten stay)"),
    "rank": Option(int, None, "dimension r of the active subspace"),
    "energy": Option(float, None, "instead of rank: the smallest r whose eigenvalues keep this fraction of the "
                     "gradient covariance's trace (default 0.99)"),
    "hidden": Option(int, 64, "width of the head's hidden layer (0: a linear head)"),
    "samples": Option(int, 2048, "training samples whose loss gradients estimate the covariance"),
    "epochs": Option(int, 20, "epochs of head training on the projected features"),
    "lr": Option(float, 1e-3, "learning rate of the head (Adam, cosine decay)"),
    "batch": Option(int, 64, "batch size of the head training"),
    "distill": Option(bool, True, "train the head on the original's outputs (soft targets) and the labels"),
    "holdout": Option(float, 0.1, "fraction of the training data held out to score the head"),
    "seed": Option(int, 0, "seed of the split, the shuffles and the head's initialisation"),
}
BATCH = 256  # samples per graph run when recording activations


@register("asnet", OPTIONS)
def asnet(graph: Graph, options: dict, context: PassContext) -> tuple[Graph, PassReport]:
    """Active-subspace network (Cui et al. 2020): cut after `layer`, project on the loss gradient's active subspace, a small MLP head for the rest."""
    data = context.training
    if data is None:
        raise PipelineError("asnet needs labelled training data (its gradients and the head's training): "
                            "tf.compress(..., train_data=...) or --train-data DIR|TASK")
    _check_options(options)
    started = time.perf_counter()
    cut, tail = _chain_after(graph, options["layer"], data)
    train, heldout = data.split(options["holdout"], options["seed"])
    z_train, z_held = _record(graph, cut.output, train.x), _record(graph, cut.output, heldout.x)
    tail_module = _tail_module(tail)
    _check_tail(graph, tail_module, train.x[:64], z_train[:64])

    fit_rows = np.random.default_rng(options["seed"]).permutation(len(z_train))[:options["samples"]]
    gradients = _loss_gradients(tail_module, z_train[fit_rows], train.y[fit_rows], train.classification)
    if options["rank"] is not None:
        space = active_subspace(gradients, rank=options["rank"])
    else:
        space = active_subspace(gradients, energy=options["energy"] or 0.99)
    basis = space.basis.astype(np.float32)  # D x r

    def project(z: np.ndarray) -> np.ndarray:
        return z.reshape(len(z), -1) @ basis

    head = _head(space.rank, options["hidden"], _outputs(graph, train.x[:1]).shape[1], options["seed"])
    teacher = _outputs(graph, train.x) if options["distill"] else None
    history = fit(head, list(head.parameters()), Labelled(project(z_train), train.y, "projected training data"),
                  Labelled(project(z_held), heldout.y, "projected held-out data"),
                  FitOptions(epochs=options["epochs"], lr=options["lr"], batch=options["batch"], seed=options["seed"]),
                  teacher, "asnet head", context.progress)

    specs = _specs(basis, head, cut.shapes[cut.output])
    result = graph.copy()
    chain = [l.name for b in tail for l in [b.layer] + ([b.bn] if b.bn is not None else [])]
    in_shape = (1, *cut.shapes[cut.output])
    before = Cost()
    for b in tail:
        before = before + b.layer.cost + (b.bn.cost if b.bn is not None else Cost())
    after = chain_cost(specs, in_shape)
    result.replace(chain, specs)

    scores = {"heldout before": _score(graph, heldout), "heldout after": _score(result, heldout)}
    report = PassReport("asnet")
    report.add(LayerRecord(
        f"{tail[0].layer.name}..{tail[-1].layer.name}", "replaced", method=_method(space, options["hidden"], specs),
        params_before=before.params, params_after=after.params, flops_before=before.flops, flops_after=after.flops,
        error_calibration=_relative(_outputs(result, heldout.x), _outputs(graph, heldout.x)),
        details={"cut after": cut.layer.name, "replaced layers": chain, "rank": space.rank,
                 "energy kept": round(space.energy, 4), "eigenvalues (top 10)": [float(e) for e in space.eigenvalues[:10]],
                 "gradient samples": len(fit_rows)},
        seconds=time.perf_counter() - started))
    if after.flops >= before.flops or after.params >= before.params:
        report.warnings.append(f"the head has {after.params:,} params and {after.flops:,} FLOPs against the replaced "
                               f"layers' {before.params:,} and {before.flops:,}: cut earlier or lower rank / hidden")
    metric = "accuracy" if data.classification else "MSE"
    report.summary = {f"held-out {metric} before": round(scores["heldout before"], 4),
                      f"held-out {metric} after": round(scores["heldout after"], 4),
                      "active subspace": f"rank {space.rank} of {basis.shape[0]}, {100 * space.energy:.2f} % of the "
                                         f"gradient covariance's trace",
                      "head": f"{_head_shape(space.rank, options['hidden'], specs)}, {options['epochs']} epochs"
                              + (", distilled from the original" if options["distill"] else ", labels only"),
                      "head training": {"epochs": history.epochs, "seconds": round(history.seconds, 2)}}
    return result, report


def _check_options(options: dict) -> None:
    problems = [
        (not options["layer"], "give layer=<name>: the conv / Linear layer after which to cut"),
        (options["rank"] is not None and options["energy"] is not None, "give rank= or energy=, not both"),
        (options["rank"] is not None and options["rank"] < 1, f"rank={options['rank']} must be >= 1"),
        (options["energy"] is not None and not 0 < options["energy"] <= 1,
         f"energy={options['energy']} must lie in (0, 1]"),
        (options["hidden"] < 0, f"hidden={options['hidden']} must be >= 0 (0: a linear head)"),
        (options["samples"] < 1 or options["epochs"] < 1 or options["batch"] < 1,
         "samples, epochs and batch must be at least 1"),
        (not options["lr"] > 0, f"lr={options['lr']} must be positive"),
        (not 0 < options["holdout"] < 1, f"holdout={options['holdout']} must lie in (0, 1)"),
    ]
    for bad, message in problems:
        if bad:
            raise PipelineError(f"asnet: {message}")


def _chain_after(graph: Graph, layer: str, data: Labelled) -> tuple[Block, list[Block]]:
    """The cut layer's block and the chain of blocks after it up to the graph's output, steps checked on data."""
    blocks = blocks_of(graph, dense_limit=sys.maxsize)  # no dense matrices here: any conv size will do
    by_name = {b.layer.name: b for b in blocks}
    if layer not in by_name:
        raise PipelineError(f"asnet: {graph.source} has no conv / Linear layer {layer!r}; its layers: "
                            f"{', '.join(by_name) or 'none'}")
    cut, tail = _walk(by_name, layer, graph)
    check_on_data(graph, [cut, *tail], {graph.inputs[0].name: data.x[:32]})
    return _walk(by_name, layer, graph)  # a step that failed its check cut its block's walk: walk again


def _walk(by_name: dict[str, Block], layer: str, graph: Graph) -> tuple[Block, list[Block]]:
    cut, tail, block = by_name[layer], [], by_name[layer]
    while block.next is not None:
        block = by_name[block.next.name]
        if block.unusable:
            raise PipelineError(f"asnet: layer {block.layer.name!r} after the cut cannot be replaced: {block.unusable}")
        tail.append(block)
    end = tail[-1] if tail else cut
    if not tail or end.steps or graph.consumers(end.output) != [GRAPH_OUTPUT]:
        where = f"{end.layer.name!r}: {end.stop}" if end.stop else f"{end.layer.name!r}"
        raise PipelineError(f"asnet: after {layer!r} the network is not a chain of conv / Linear layers up to the "
                            f"output (it breaks after {where}); cut at a later layer")
    return cut, tail


def _record(graph: Graph, tensor: str, x: np.ndarray) -> np.ndarray:
    name = graph.inputs[0].name
    parts = [graph.run({name: x[i:i + BATCH]}, record=[tensor])[tensor] for i in range(0, len(x), BATCH)]
    return np.concatenate(parts).astype(np.float32)


def _outputs(graph: Graph, x: np.ndarray) -> np.ndarray:
    return graph_outputs(graph, x, BATCH).astype(np.float32)


def _tail_module(tail: list[Block]) -> nn.Module:
    """The network after the cut as torch modules, rebuilt from its specs and checked steps."""
    modules: list[nn.Module] = []
    for block in tail:
        modules.append(to_module(block.layer.spec))
        for step in block.steps:
            if step.kind == "batchnorm":
                modules.append(to_module(step.bn.spec))
            elif step.kind == "activation":
                modules.append(nn.ReLU() if step.function == "relu" else nn.LeakyReLU(step.alpha))
            elif step.kind == "pool":
                pool = nn.MaxPool1d if len(step.window) == 1 else nn.MaxPool2d
                modules.append(pool(step.window, stride=step.window))
            elif step.kind == "reshape":
                modules.append(ReshapeModule(block.shapes[step.output]))
    return nn.Sequential(*modules).eval()


def _check_tail(graph: Graph, tail: nn.Module, x: np.ndarray, z: np.ndarray) -> None:
    expected = _outputs(graph, x)
    with torch.no_grad():
        got = tail(torch.from_numpy(z)).numpy()
    error = _relative(got, expected)
    if got.shape != expected.shape or error > 1e-4:
        raise PipelineError(f"asnet: the layers after the cut, rebuilt from their specs, do not reproduce "
                            f"{graph.source}'s output (relative error {error:.3g}); nothing was changed")


def _loss_gradients(tail: nn.Module, z: np.ndarray, y: np.ndarray, classification: bool) -> np.ndarray:
    """dL/dz per sample (N x D). The tail treats samples independently (eval mode), so the gradient of the
    summed loss with respect to a batch is every sample's own gradient."""
    rows = []
    for i in range(0, len(z), BATCH):
        zb = torch.from_numpy(z[i:i + BATCH]).requires_grad_(True)
        out = tail(zb)
        target = torch.from_numpy(y[i:i + BATCH])
        loss = F.cross_entropy(out, target, reduction="sum") if classification else \
            F.mse_loss(out, target.to(out.dtype), reduction="sum")
        (grad,) = torch.autograd.grad(loss, zb)
        rows.append(grad.reshape(len(zb), -1).numpy())
    return np.concatenate(rows)


def _head(rank: int, hidden: int, classes: int, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if not hidden:
            return nn.Sequential(nn.Linear(rank, classes))
        return nn.Sequential(nn.Linear(rank, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def _specs(basis: np.ndarray, head: nn.Module, cut_shape: tuple[int, ...]) -> list[Spec]:
    specs: list[Spec] = [Reshape((basis.shape[0],))] if len(cut_shape) != 1 else []
    specs.append(Linear(np.ascontiguousarray(basis.T), None))
    for module in head:
        if isinstance(module, nn.Linear):
            specs.append(Linear(module.weight.detach().numpy().copy(), module.bias.detach().numpy().copy()))
        else:
            specs.append(Activation("relu"))
    return specs


def _head_shape(rank: int, hidden: int, specs: list[Spec]) -> str:
    outputs = specs[-1].weight.shape[0]
    return f"MLP {rank}-{hidden}-{outputs}" if hidden else f"linear {rank}-{outputs}"


def _method(space, hidden: int, specs: list[Spec]) -> str:
    return f"asnet[{space.basis.shape[0]} -> rank {space.rank}, head {_head_shape(space.rank, hidden, specs)}]"


def _score(graph: Graph, data: Labelled) -> float:
    out = _outputs(graph, data.x)
    if data.classification:
        return float(np.mean(out.argmax(axis=1) == data.y))
    return float(np.mean((out - data.y) ** 2))


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)) if a.shape == b.shape else math.inf
