"""finetune: train a (compressed) graph on labelled data, optionally distilling from the original.

Default: every weight trains, BatchNorm statistics and dropout stay fixed (eval mode: the small
batches of a fine-tune would make the statistics noisy, and after fold_bn there are none);
`freeze=first|last|<glob>` keeps layers as they are. One sample in ten is held out: its score
before and after each epoch is in the report, and the weights kept are those that score best on
it (keep=best, the starting ones included); the test set is never touched.
"""
from __future__ import annotations

import fnmatch
from typing import Any

import numpy as np

from tensorfold.ir.errors import PipelineError
from tensorfold.ir.graph import Graph

from ..registry import Option, PassContext, register
from ..report import LayerRecord, PassReport
from .loop import FitOptions, Labelled, check_fits, fit, outputs
from .trainable import trainable

OPTIONS = {
    "epochs": Option(int, 1, "passes over the training data"),
    "lr": Option(float, 1e-3, "learning rate (cosine decay to 0 over the run)"),
    "batch": Option(int, 64, "batch size"),
    "optimizer": Option(str, "adam", "adam or sgd (momentum 0.9, nesterov)"),
    "weight_decay": Option(float, 0.0, "L2 weight decay"),
    "distill": Option(bool, True, "distil from the teacher (in a pipeline: its input graph, the original): soft "
                      "targets + labels; false: labels only"),
    "alpha": Option(float, 0.5, "weight of the teacher term: (1-alpha)*CE + alpha*T^2*KL"),
    "temperature": Option(float, 4.0, "softmax temperature T of the teacher term"),
    "freeze": Option(str, "", "layers that stay as they are: first, last, or glob patterns on layer names, "
                     "separated by |"),
    "bn": Option(str, "frozen", "frozen (eval mode: BatchNorm statistics and dropout fixed) or train"),
    "holdout": Option(float, 0.1, "fraction of the training data held out to score each epoch"),
    "seed": Option(int, 0, "seed of the shuffles, the held-out split and dropout"),
    "backoff": Option(int, 2, "times training may restart from the starting weights at lr/10 when the held-out "
                      "score collapses after an epoch, the loss stops being finite, or (keep=best) no epoch reaches "
                      "the starting score (0: never)"),
    "keep": Option(str, "best", "best: the weights with the best held-out score, the starting ones included "
                   "(fine-tuning never delivers a model worse on the held-out data than it was given); last: the "
                   "last epoch's"),
}


def parse_options(text: str, **defaults: Any) -> dict[str, Any]:
    """finetune options spelled inside another pass's option, e.g. musco(finetune=(epochs=2, lr=0.0005))."""
    from ..pipeline import parse
    from ..registry import get

    text = text.strip()
    text = text[1:-1] if text.startswith("(") and text.endswith(")") else text
    (_, given), = parse(f"finetune({text})") if text else [("finetune", {})]
    return get("finetune").resolve({**defaults, **given})


def fit_options(options: dict[str, Any]) -> FitOptions:
    return FitOptions(epochs=options["epochs"], lr=options["lr"], batch=options["batch"],
                      optimizer=options["optimizer"], weight_decay=options["weight_decay"], alpha=options["alpha"],
                      temperature=options["temperature"], bn=options["bn"], seed=options["seed"],
                      backoff=options["backoff"], keep_best=options["keep"] == "best")


def finetune_graph(graph: Graph, data: Labelled, options: dict[str, Any], teacher: Graph | None = None,
                   progress: bool = False, label: str = "finetune") -> tuple[Graph, PassReport]:
    """(trained copy of `graph`, report). `graph` is untouched; layer kinds and shapes are kept."""
    _check_options(options, label)
    teacher = teacher if options["distill"] else None
    report = PassReport(label)
    if len(graph.inputs) != 1:
        raise PipelineError(f"{label}: {graph.source} has {len(graph.inputs)} inputs; fine-tuning takes one")
    view = trainable(graph, label)
    check_fits(view.module, data, graph.source, graph.inputs[0].shape)
    frozen = _frozen_layers(graph, options["freeze"], report)
    parameters = view.parameters(frozen)
    train, heldout = data.split(options["holdout"], options["seed"])
    teacher_out = None
    if teacher is not None:
        teacher_out = graph_outputs(teacher, train.x)
        student_shape = outputs(view.module, train.x[:1]).shape[1:]
        if teacher_out.shape[1:] != student_shape:
            raise PipelineError(f"{label}: the teacher {teacher.source} outputs shape {teacher_out.shape[1:]}, the "
                                f"student {graph.source} {student_shape}")
    history = fit(view.module, parameters, train, heldout, fit_options(options), teacher_out, label, progress)
    result = view.finish()
    for layer in graph.layers():
        if layer.spec is not None and layer.name not in frozen:
            report.add(LayerRecord(layer.name, "trained", method=f"{len(train.y)} samples x {options['epochs']} epochs",
                                   params_before=_params(layer), params_after=_params(layer)))
    for name in frozen:
        report.skip(name, "frozen (freeze=)")
    metric = "accuracy" if history.metric == "top1" else "MSE"
    report.summary = {
        f"held-out {metric} before": round(history.before, 4),
        f"held-out {metric} after": round(history.after, 4),
        "epochs": [{k: round(v, 4) if isinstance(v, float) else v for k, v in e.items()} for e in history.epochs],
        "training samples": len(train.y), "held-out samples": len(heldout.y),
        "trained parameters": int(sum(p.numel() for p in parameters)),
        "teacher": (f"{teacher.source} (alpha {options['alpha']}, T {options['temperature']})"
                    if teacher is not None else "none"),
        "training seconds": round(history.seconds, 2),
    }
    if history.kept is not None:
        report.summary["kept"] = ("the starting weights (no epoch beat them held out)" if history.kept["epoch"] == 0
                                  else f"epoch {history.kept['epoch']} at lr {history.kept['lr']:g}")
        if history.kept["epoch"] == 0:
            report.warnings.append(f"{label}: no epoch improved the held-out {metric} "
                                   f"({history.before:.4f}); the model is returned as it was given")
    if history.backoffs:
        report.summary["lr"] = history.lr
        report.summary["lr back-offs"] = [{k: round(v, 4) if isinstance(v, float) else v for k, v in b.items()}
                                          for b in history.backoffs]
        report.warnings += [f"{label}: {b['why']} at lr {b['lr']:g}; restarted from the starting weights"
                            for b in history.backoffs]
        report.warnings.append(f"{label}: trained at lr {history.lr:g} instead of {options['lr']:g}")
    report.warnings += view.notes
    return result, report


@register("finetune", OPTIONS)
def finetune(graph: Graph, options: dict, context: PassContext) -> tuple[Graph, PassReport]:
    """Train the graph on labelled data (layer structure and ranks kept); distils from the pipeline's input graph."""
    if context.training is None:
        raise PipelineError("finetune needs labelled training data: tf.compress(..., train_data=<task name | "
                            "ImageFolder dir | (inputs, labels) | DataLoader>) or `tensorfold compress ... "
                            "--train-data DIR|TASK` (a task model uses its training split by default)")
    teacher = context.teacher if options["distill"] else None
    return finetune_graph(graph, context.training, options, teacher, context.progress)


def _check_options(options: dict[str, Any], label: str) -> None:
    if options["epochs"] < 1 or options["batch"] < 1:
        raise PipelineError(f"{label}: epochs and batch must be at least 1 (epochs={options['epochs']}, "
                            f"batch={options['batch']})")
    if not options["lr"] > 0:
        raise PipelineError(f"{label}: lr={options['lr']} must be positive")
    if options["backoff"] < 0:
        raise PipelineError(f"{label}: backoff={options['backoff']} must be 0 or more")
    if not 0 < options["holdout"] < 1:
        raise PipelineError(f"{label}: holdout={options['holdout']} must lie in (0, 1)")
    if options["keep"] not in ("best", "last"):
        raise PipelineError(f"{label}: keep={options['keep']!r}; expected best or last")
    if not 0 <= options["alpha"] <= 1 or not options["temperature"] > 0:
        raise PipelineError(f"{label}: alpha must lie in [0, 1] and temperature be positive")


def _frozen_layers(graph: Graph, freeze: str, report: PassReport) -> list[str]:
    weighted = [l.name for l in graph.layers() if l.spec is not None and l.kind in ("conv", "linear",
                                                                                   "conv_transpose")]
    frozen = []
    for pattern in [p.strip() for p in (freeze or "").split("|") if p.strip()]:
        if pattern == "first":
            hits = weighted[:1]
        elif pattern == "last":
            hits = weighted[-1:]
        else:
            hits = [l.name for l in graph.layers() if fnmatch.fnmatchcase(l.name, pattern)]
        if not hits:
            raise PipelineError(f"finetune: freeze pattern {pattern!r} matches no layer; layers: "
                                f"{', '.join(l.name for l in graph.layers()[:12])}")
        frozen += [h for h in hits if h not in frozen]
    return frozen


def graph_outputs(teacher: Graph, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """The graph's first output on `x`, run in batches."""
    name = teacher.inputs[0].name
    key = teacher.output_names[0]
    return np.concatenate([teacher.run({name: x[i:i + batch]})[key] for i in range(0, len(x), batch)])


def _params(layer) -> int:
    from tensorfold.ir.specs import arrays_of

    return int(sum(a.size for a in arrays_of(layer.spec).values()))
