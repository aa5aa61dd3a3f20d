"""tensorfold: capture a model, rewrite it with passes, build it with TVM, measure it per target.

    import tensorfold as tf
    g = tf.capture(model, example_inputs)     # or tf.load("model.onnx")
    g2, report = tf.compress(g, "fold_bn")
    artifact = tf.build(g2, "x86", "out/", tune_trials=64)
"""
from __future__ import annotations

from typing import Any

from tensorfold.ir import Graph, capture, load
from tensorfold.ir.errors import TensorfoldError
from tensorfold.passes import Report, run as _run_pipeline
from tensorfold.build import build
from tensorfold.measure import measure

__version__ = "0.1.0"


def compress(graph_or_module: Any, passes: Any, calibration: Any = None, example_inputs: Any = None,
             progress: bool = False, train_data: Any = None) -> tuple[Graph, Report]:
    """Run a pipeline ("fold_bn, svd(rank=8)" or [(name, options), ...]) on a Graph or a module.

    `calibration`: a list of arrays / tensors / {input name: array} dicts, a DataLoader, an
    ImageFolder directory, a .npy file or a task name, whose calibration split (a slice of its
    training data) is used: "digits", "mnist1d-mlp", "mnist1d-cnn", "resnet18-digits"
    (`tensorfold tasks`; runtime/calibration.py); errors are then also measured on it, and
    data-driven passes (int8) calibrate on it.

    `train_data`: labelled data for the training passes (finetune, musco): a task name (its
    training split), an ImageFolder directory, (inputs, labels) arrays or a DataLoader.
    """
    graph = graph_or_module
    if not isinstance(graph, Graph):
        if example_inputs is None:
            raise TensorfoldError("compress(module, ...) needs example_inputs=...; or pass tf.capture(module, inputs)")
        graph = capture(graph_or_module, example_inputs)
    feeds = None
    if calibration is not None:
        from tensorfold.runtime.calibration import calibration_feeds

        feeds = calibration_feeds(calibration, graph)
    training = _labelled(train_data, graph) if train_data is not None else None
    return _run_pipeline(graph, passes, calibration=feeds, progress=progress, training=training)


def finetune(graph: Graph, data: Any, epochs: int = 1, lr: float = 1e-3, teacher: Graph | None = None,
             progress: bool = False, **options: Any) -> tuple[Graph, Any]:
    """Train `graph` on labelled `data` (a task name, an ImageFolder, (inputs, labels), a DataLoader);
    with `teacher` (e.g. the original graph) it distils from it. Returns (trained graph, PassReport);
    layer structure and ranks are kept. More options: batch, optimizer, weight_decay, alpha,
    temperature, freeze, bn, holdout, seed, backoff (`tensorfold passes` lists them under finetune)."""
    from tensorfold.passes import load_all
    from tensorfold.passes.registry import get
    from tensorfold.passes.training.finetune import finetune_graph

    load_all()
    resolved = get("finetune").resolve({"epochs": epochs, "lr": lr, **options})
    return finetune_graph(graph, _labelled(data, graph), resolved, teacher, progress)


def deploy(model: Any, target: str = "x86", out: str = "deploy", **options: Any):
    """Compress `model` for `target` to a requested speed-up or latency, chosen from latencies measured
    on the target, then build and measure it: see `tensorfold.deployment.deploy` for the options
    (speedup, latency_ms, max_drop, data, calibration, train_data, engine, tune_trials, recipe, ...)
    and docs/deploy.md. Returns a DeployResult (`.report`, `.graph`, `.met`)."""
    from tensorfold.deployment import deploy as _deploy

    return _deploy(model, target, out, **options)


def _labelled(data: Any, graph: Graph):
    from tensorfold.passes.training import Labelled
    from tensorfold.runtime.datasets import load_training_data

    x, y, what = load_training_data(data, graph.inputs[0].shape)
    return Labelled(x, y, f"training data {what}")


__all__ = ["Graph", "Report", "TensorfoldError", "build", "capture", "compress", "deploy", "finetune", "load", "measure"]
