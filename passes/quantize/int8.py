"""int8: post-training static quantization into a QDQ ONNX graph (onnxruntime.quantization).

onnxruntime's quantizer is the kept implementation of min/max and percentile calibration
and of the QDQ format that its int8 kernels (and TVM's import, see targets/int8/relax.py)
recognise, so this pass drives it rather than writing another quantizer: weights int8,
symmetric, per output channel; activations uint8 (asymmetric) per tensor — u8 x s8 is the
pair x86 VNNI multiplies. A torch graph is exported to ONNX first: the result is ONNX.

The per-layer error is the layer's own int8 arithmetic against its float arithmetic on
the same recorded input: input fake-quantized with the layer's activation scale and zero
point, weights and bias dequantized from the stored integers.
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
import logging
import os
import platform
import tempfile
import time

import numpy as np
import onnx
from onnx import numpy_helper

from tensorfold.ir.errors import ExportError, PipelineError, TensorfoldError
from tensorfold.ir.graph import Graph, Layer
from tensorfold.ir.onnx_graph import OnnxGraph, opset_version
from tensorfold.ir.quant_math import fake_quant
from tensorfold.ir.specs import Linear

from ..measure import Feeds, layer_error
from ..registry import Option, PassContext, register
from ..report import LayerRecord, PassReport

QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")


@register("int8", options={
    "calibrate": Option(str, "minmax", "activation ranges: minmax or percentile"),
    "percentile": Option(float, 99.999, "the percentile kept when calibrate=percentile"),
    "per_channel": Option(bool, True, "one weight scale per output channel (else per tensor)"),
    "keep_first": Option(bool, False, "leave the first conv/linear layer in float"),
    "keep_last": Option(bool, False, "leave the last conv/linear layer in float"),
    "exclude": Option(str, "", "layers left in float: glob patterns on layer names, '|'-separated"),
    "reduce_range": Option(str, "auto", "weights in 7 bits, so that x86 without VNNI (vpmaddubsw) cannot saturate: "
                                        "true, false, or auto (true when this CPU is such a one)"),
})
def int8(graph: Graph, options: dict, context: PassContext) -> tuple[Graph, PassReport]:
    """Post-training static int8 (QDQ ONNX: s8 per-channel weights, u8 per-tensor activations); needs calibration data."""
    started = time.perf_counter()
    report = PassReport("int8")
    feeds = context.inputs.calibration
    if not feeds:
        raise PipelineError("int8 needs calibration data: tf.compress(graph, 'int8', calibration=...) or "
                            "`tensorfold compress ... --calibration PATH` (a .npy, an ImageFolder directory, 'digits')")
    if options["calibrate"] not in ("minmax", "percentile"):
        raise PipelineError(f"int8: calibrate={options['calibrate']!r}; expected minmax or percentile")
    if not 0 < options["percentile"] <= 100:
        raise PipelineError(f"int8: percentile={options['percentile']} must lie in (0, 100]")
    options = {**options, "reduce_range": _reduce_range(options["reduce_range"], report)}
    source = _as_onnx(graph)
    options = _prepare(source, options, report)
    layers = [l for l in source.layers() if l.kind in ("conv", "linear") and l.facts["op"] in QUANTIZED_OPS]
    kept = _kept_in_float(layers, options, report)
    for layer in layers:
        if layer.spec is None or layer.unusable:
            kept.setdefault(layer.name, f"not quantized: {layer.unusable}")
    result = _quantized_graph(source, graph, feeds, options, layers, kept)
    for name, reason in kept.items():
        report.skip(name, reason)
    for layer in layers:
        if layer.name in kept:
            continue
        record = _layer_record(source, result, layer, context)
        if record is None:
            report.skip(layer.name, "onnxruntime left it in float (no quantized input or weight)")
        else:
            report.add(record)
    read = {n for l in layers for n in l.facts["nodes"]}
    producers = {o: n.op_type for n in result.model.graph.node for o in n.output}
    for node in result.model.graph.node:
        if (node.op_type in QUANTIZED_OPS and node.name not in read
                and all(producers.get(name) == "DequantizeLinear" for name in node.input[:2])):
            report.add(LayerRecord(node.name, "quantized", f"a {node.op_type} tensorfold does not read as a layer "
                                   "(e.g. its weight on the left): its error is in the whole-model error only",
                                   method="int8 (onnxruntime's quantizer)"))
    report.summary = {"model bytes fp32": source.model.ByteSize(), "model bytes int8": result.model.ByteSize(),
                      "calibration batches": len(feeds), "weight bits": 7 if options["reduce_range"] else 8}
    report.warnings.append("random inputs fall outside the calibrated ranges, so their errors are an upper bound; "
                           "the calibration errors are the ones that predict accuracy")
    return result, report


VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}  # /proc/cpuinfo names of x86's u8 x s8 -> s32 dot products


def u8s8_saturates() -> bool:
    """Whether this CPU is x86 without a VNNI dot product: there onnxruntime's (and oneDNN's) u8 x s8 kernels
    multiply with vpmaddubsw, whose 16-bit sum of two products saturates (255 * 127 * 2 > 32767): full-range
    weights give silently wrong outputs (15 % error on a random matmul on a Zen 3). 7-bit weights cannot."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.partition(":")[2].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return not VNNI_FLAGS & set(flags)


def _reduce_range(value: str, report: PassReport) -> bool:
    value = value.strip().lower()
    if value not in ("auto", "true", "false"):
        raise PipelineError(f"int8: reduce_range={value!r}; expected auto, true or false")
    if value != "auto":
        return value == "true"
    if u8s8_saturates():
        report.warnings.append("weights quantized in 7 bits (reduce_range=auto): this CPU is x86 without VNNI, whose "
                               "int8 kernels saturate on full-range weights; reduce_range=false for a model that "
                               "will only run on CPUs with VNNI (or ARM)")
        return True
    return False


def _as_onnx(graph: Graph) -> OnnxGraph:
    if isinstance(graph, OnnxGraph):
        return graph.copy()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        graph.save(path)
        model = onnx.load(path)
    return OnnxGraph(model, graph.source, {i.name: i.shape for i in graph.inputs})


def _prepare(source: OnnxGraph, options: dict, report: PassReport) -> dict:
    """Bring a file from another exporter to what the quantizer needs (edits `source`, exact);
    returns the options to quantize with."""
    lifted = source.materialize_weights()
    if lifted:
        report.warnings.append(f"{len(lifted)} weight(s) computed by nodes (Constant, ConstantOfShape, ...) stored "
                               "as initializers, so that they are quantized as weights")
    if options["per_channel"]:
        try:
            before = opset_version(source.model)
            if source.upgrade_opset(13, "per-channel int8 (DequantizeLinear's axis)"):
                report.warnings.append(f"opset {before} raised to 13 with ONNX's version converter: "
                                       "per-channel Q/DQ needs opset 13")
        except ExportError as e:
            report.warnings.append(f"quantized per tensor, not per channel: {e}")
            options = {**options, "per_channel": False}
    return options


def _quantized_graph(source: OnnxGraph, graph: Graph, feeds: Feeds, options: dict, layers: list[Layer],
                     kept: dict[str, str]) -> OnnxGraph:
    """Quantize all but `kept`; a layer whose int8 form cannot be read back (so neither run nor
    measured by tensorfold) joins `kept` with the reason, and the rest is quantized again."""
    shapes = {i.name: i.shape for i in graph.inputs}
    for _ in range(3):
        quantized = _quantize(source, feeds, options, exclude=[n for l in layers if l.name in kept
                                                               for n in l.facts["nodes"]])
        try:
            result = OnnxGraph(quantized, f"{graph.source} (int8)", shapes)
            result.run(result.random_inputs())
        except TensorfoldError as e:
            raise PipelineError(f"{graph.source}: onnxruntime's quantizer made a graph onnxruntime cannot run "
                                f"(a tensorfold bug; the input model is fine): {e}") from e
        specs = {l.name: l.spec for l in result.layers()}
        unreadable = [l.name for l in layers if l.name not in kept and l.name in specs and specs[l.name] is None]
        if not unreadable:
            result.source = graph.source  # saving it must still refuse to overwrite the input file
            return result
        for name in unreadable:
            kept[name] = "kept in float: its quantized weights could not be read back to run and measure it"
    raise PipelineError(f"{graph.source}: int8 could not settle which layers to quantize")


def _kept_in_float(layers: list[Layer], options: dict, report: PassReport) -> dict[str, str]:
    kept = {}
    if options["keep_first"] and layers:
        kept[layers[0].name] = "kept in float: keep_first=true"
    if options["keep_last"] and layers:
        kept[layers[-1].name] = "kept in float: keep_last=true"
    for pattern in filter(None, (p.strip() for p in options["exclude"].split("|"))):
        matched = [l.name for l in layers if fnmatch.fnmatchcase(l.name, pattern)]
        if not matched:
            report.warnings.append(f"exclude pattern {pattern!r} matches no conv/linear layer")
        for name in matched:
            kept.setdefault(name, f"kept in float: excluded by {pattern!r}")
    return kept


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: Feeds) -> None:
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)

    def rewind(self) -> None:  # pragma: no cover - only the SmoothQuant path of onnxruntime rewinds
        raise NotImplementedError


def _quantize(source: OnnxGraph, feeds: Feeds, options: dict, exclude: list[str]) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    reader = type("Reader", (_Reader, CalibrationDataReader), {})(feeds)
    method = CalibrationMethod.MinMax if options["calibrate"] == "minmax" else CalibrationMethod.Percentile
    extra = {"WeightSymmetric": True, "ActivationSymmetric": False}
    if options["calibrate"] == "percentile":
        extra["CalibPercentile"] = options["percentile"]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # onnxruntime's quantizer logs advice on the root logger at every call
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "int8.onnx")
        try:
            quantize_static(copy.deepcopy(source.model), path, reader, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(QUANTIZED_OPS), per_channel=options["per_channel"],
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=exclude, calibrate_method=method, extra_options=extra,
                            reduce_range=options["reduce_range"])
        except Exception as e:  # noqa: BLE001 - named, with the model it failed on
            raise PipelineError(f"{source.source}: onnxruntime's int8 quantizer failed: {type(e).__name__}: {e}") from e
        finally:
            root.setLevel(level)
        return onnx.load(path)


def _layer_record(source: OnnxGraph, result: OnnxGraph, layer: Layer, context: PassContext) -> LayerRecord | None:
    started = time.perf_counter()
    quantized = result.model
    node = next((n for n in quantized.graph.node if n.name == layer.name), None)
    producers = {o: n for n in quantized.graph.node for o in n.output}
    dq = producers.get(node.input[0]) if node is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or node.input[1] not in producers:
        return None
    constants = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    scale, zero_point = constants[dq.input[1]], constants[dq.input[2]]
    # the result reads each quantized layer with the dequantized values its int8 kernels use
    int8_spec = result.layer(layer.name).spec
    if isinstance(int8_spec, Linear) and int8_spec.bias is None and layer.spec.bias is not None:
        # MatMul + Add: the quantizer puts a Q/DQ on the MatMul's output, so the Add (still in
        # float, same bias) is no longer read as part of the layer; it still runs after it
        int8_spec = dataclasses.replace(int8_spec, bias=layer.spec.bias)
    error_random, error_calibration = layer_error(source, [layer], [int8_spec], context.inputs,
                                                  new_input=lambda x: fake_quant(x, scale, zero_point))
    weight = constants.get(producers[node.input[1]].input[0])
    return LayerRecord(
        layer.name, "quantized", method="int8 (u8 activations, s8 weights)",
        params_before=layer.cost.params, params_after=layer.cost.params,
        flops_before=layer.cost.flops, flops_after=layer.cost.flops,
        error_random=error_random, error_calibration=error_calibration,
        details={"input_scale": float(scale), "input_zero_point": int(zero_point),
                 "weight_dtype": str(weight.dtype) if weight is not None else None,
                 "weight_scales": int(np.size(constants.get(producers[node.input[1]].input[1], 1)))},
        seconds=time.perf_counter() - started)
