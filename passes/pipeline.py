"""A pipeline spelled as text ("fold_bn, tucker2(rank=evbmf(weaken=0.8)), svd(energy=0.95)") and its run."""
from __future__ import annotations

import re
import time
from typing import Any, Sequence, Union

from tensorfold.ir.errors import PipelineError
from tensorfold.ir.graph import Graph

from . import registry
from .measure import ErrorInputs, Feeds, output_error
from .report import Report

Steps = list[tuple[str, dict[str, Any]]]
PipelineSpec = Union[str, Sequence[Union[str, tuple[str, dict[str, Any]]]]]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _split_top_level(text: str, where: str) -> list[str]:
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise PipelineError(f"unbalanced ')' in {where!r}")
        if ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    if depth:
        raise PipelineError(f"unbalanced '(' in {where!r}")
    parts.append("".join(current).strip())
    return parts


def _value(text: str) -> Any:
    """Ints, floats and booleans become numbers; anything else (evbmf(weaken=0.8), params:0.5) stays text."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def parse(text: str) -> Steps:
    steps = []
    for part in _split_top_level(text, text):
        if not part:
            raise PipelineError(f"empty step in pipeline {text!r}")
        name, _, rest = part.partition("(")
        name = name.strip()
        if not _NAME.match(name):
            raise PipelineError(f"bad pass name {name!r} in pipeline {text!r}")
        options: dict[str, Any] = {}
        if rest:
            if not rest.rstrip().endswith(")"):
                raise PipelineError(f"step {part!r} must end with ')'")
            inner = rest.rstrip()[:-1]
            for item in _split_top_level(inner, part) if inner.strip() else []:
                key, eq, value = item.partition("=")
                if not eq or not _NAME.match(key.strip()):
                    raise PipelineError(f"option {item!r} of {name!r} must look like key=value")
                options[key.strip()] = _value(value.strip())
        steps.append((name, options))
    return steps


def normalize(passes: PipelineSpec) -> Steps:
    if isinstance(passes, str):
        return parse(passes)
    steps = []
    for step in passes:
        if isinstance(step, str):
            steps += parse(step)
        else:
            name, options = step
            steps.append((name, dict(options or {})))
    return steps


def run(graph: Graph, passes: PipelineSpec, calibration: Feeds | None = None,
        progress: bool = False, training: Any = None) -> tuple[Graph, Report]:
    """Check every step first (unknown passes or options fail before any work), then run them in order.

    `training`: labelled data (passes.training.Labelled) for training passes (finetune, musco).
    """
    from . import load_all

    load_all()
    steps = [(registry.get(name), options) for name, options in normalize(passes)]
    resolved = [(info, info.resolve(options)) for info, options in steps]
    graph.check_finite()
    inputs = ErrorInputs.for_graph(graph, calibration)
    report = Report(graph.source, params_before=graph.total_params(), flops_before=graph.layer_cost().flops,
                    unknown_ops=graph.unknown_ops())
    original, current = graph, graph
    for info, options in resolved:
        started = time.perf_counter()
        result, pass_report = info.fn(current, options, registry.PassContext(inputs, progress, training, original))
        pass_report.options = options
        pass_report.seconds = time.perf_counter() - started
        pass_report.params_before, pass_report.params_after = current.total_params(), result.total_params()
        pass_report.flops_before, pass_report.flops_after = current.layer_cost().flops, result.layer_cost().flops
        pass_report.output_error_random = output_error(current, result, inputs.random)
        pass_report.output_error_calibration = output_error(current, result, inputs.calibration_for_errors)
        report.passes.append(pass_report)
        current = result
    report.params_after, report.flops_after = current.total_params(), current.layer_cost().flops
    report.output_error_random = output_error(original, current, inputs.random)
    report.output_error_calibration = output_error(original, current, inputs.calibration_for_errors)
    return current, report
