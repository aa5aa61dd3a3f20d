"""fold_bn: fold inference batch norms into the neighbouring conv / linear layer (exact)."""
from __future__ import annotations

import time

from tensorfold.ir.graph import GRAPH_OUTPUT, Graph, Layer
from tensorfold.ir.specs import Linear, chain_cost

from .bn_math import fold_after, fold_before
from .measure import layer_error
from .registry import Option, PassContext, register
from .report import LayerRecord, PassReport

_PRODUCERS = ("conv", "conv_transpose", "linear")


def _forward_reason(graph: Graph, producer: Layer | None, bn: Layer) -> str | None:
    """Why `producer -> bn` cannot fold (None if it can)."""
    if producer is None or producer.kind not in _PRODUCERS:
        return "no conv/linear producer"
    if producer.spec is None or producer.unusable:
        return f"producer {producer.name!r} is unusable: {producer.unusable}"
    others = [c for c in graph.consumers(producer.output) if c not in (bn.name, bn.facts.get("node"))]
    if others:
        return f"its producer {producer.name!r} has other consumers ({', '.join(others)}); folding would change them"
    if isinstance(producer.spec, Linear) and len(producer.out_shape) != 2:
        return f"a batch norm over axis 1 of the {len(producer.out_shape)}-D output of linear {producer.name!r} is not per-feature"
    return None


def _backward_reason(graph: Graph, bn: Layer) -> tuple[Layer | None, str | None]:
    """The layer `bn -> layer` can fold into, or why not."""
    consumers = graph.consumers(bn.output)
    if len(consumers) != 1 or consumers[0] == GRAPH_OUTPUT:
        return None, "its output goes to several consumers or is a graph output"
    consumer = next((l for l in graph.layers() if l.input == bn.output and l.kind in ("conv", "linear")), None)
    if consumer is None:
        return None, "no conv/linear consumer"
    if consumer.spec is None or consumer.unusable:
        return None, f"consumer {consumer.name!r} is unusable: {consumer.unusable}"
    if isinstance(consumer.spec, Linear) and len(consumer.in_shape) != 2:
        return None, "the linear consumer does not read axis 1 as its features"
    if getattr(consumer.spec, "has_padding", False):
        return None, (f"BN->conv into {consumer.name!r}, which zero-pads: the padded zeros would become BN's shift, "
                      "so folding would be inexact at the borders")
    return consumer, None


@register("fold_bn", options={
    "bn_before_conv": Option(bool, True, "also fold a BN that feeds a conv/linear, where that is exact (no zero padding)"),
})
def fold_bn(graph: Graph, options: dict, context: PassContext) -> tuple[Graph, PassReport]:
    """Fold Conv->BN, ConvTranspose->BN, Linear->BN1d (and, where exact, BN->Conv) into one layer."""
    report = PassReport("fold_bn")
    if graph.training:
        report.warnings.append("the model was in train mode: it was put in eval mode and its running "
                               "statistics folded (never batch statistics)")
        graph = graph.eval()
    else:
        graph = graph.copy()
    bn_names = [layer.name for layer in graph.layers() if layer.kind == "batchnorm"]
    for name in bn_names:
        started = time.perf_counter()
        bn = graph.layer(name)
        if bn.spec is None or bn.unusable:
            report.skip(name, bn.unusable or "unusable")
            continue
        producer = graph.producer(bn.input)
        forward_why = _forward_reason(graph, producer, bn)
        if forward_why is None:
            chain, new_spec = [producer, bn], fold_after(producer.spec, bn.spec)
        else:
            consumer, backward_why = _backward_reason(graph, bn) if options["bn_before_conv"] else (None, "bn_before_conv=false")
            if consumer is None:
                report.skip(name, f"not folded: {forward_why}; and as BN->layer: {backward_why}")
                continue
            chain, new_spec = [bn, consumer], fold_before(bn.spec, consumer.spec)
        before = chain_cost([l.spec for l in chain], chain[0].in_shape)
        after = chain_cost([new_spec], chain[0].in_shape)
        err_random, err_calibration = layer_error(graph, chain, [new_spec], context.inputs)
        graph.replace([l.name for l in chain], [new_spec])
        report.add(LayerRecord(
            name, "folded", method=f"into {chain[0].name if chain[1] is bn else chain[1].name}",
            params_before=before.params, params_after=after.params,
            flops_before=before.flops, flops_after=after.flops,
            error_random=err_random, error_calibration=err_calibration,
            details={"direction": "after" if chain[1] is bn else "before"},
            seconds=time.perf_counter() - started))
    return graph, report
