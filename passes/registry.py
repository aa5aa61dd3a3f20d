"""Passes registered by public name, with their options (what `tensorfold passes` lists)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from tensorfold.ir.errors import PipelineError
from tensorfold.ir.graph import Graph

from .measure import ErrorInputs
from .report import PassReport


@dataclass(frozen=True)
class Option:
    type: type
    default: Any
    help: str


@dataclass
class PassContext:
    """What a pass may use besides its options: the inputs errors are measured on, progress, and for
    training passes labelled data and the pipeline's input graph (the teacher for distillation)."""

    inputs: ErrorInputs
    progress: bool = False
    training: Any = None          # passes.training.Labelled, or None when no training data was given
    teacher: Graph | None = None


PassFn = Callable[[Graph, dict, PassContext], tuple[Graph, PassReport]]


@dataclass
class PassInfo:
    name: str
    fn: PassFn
    options: dict[str, Option] = field(default_factory=dict)
    doc: str = ""

    def resolve(self, given: dict[str, Any]) -> dict[str, Any]:
        """Defaults filled in, names and types checked; errors list what exists."""
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            known = ", ".join(f"{k}=<{o.type.__name__}>" for k, o in self.options.items()) or "none"
            raise PipelineError(f"pass {self.name!r} has no option {', '.join(unknown)}; its options: {known}")
        resolved = {k: o.default for k, o in self.options.items()}
        for key, value in given.items():
            resolved[key] = _coerce(self.name, key, value, self.options[key].type)
        return resolved


PASSES: dict[str, PassInfo] = {}


def register(name: str, options: dict[str, Option] | None = None) -> Callable[[PassFn], PassFn]:
    def decorate(fn: PassFn) -> PassFn:
        PASSES[name] = PassInfo(name, fn, dict(options or {}), (fn.__doc__ or "").strip())
        return fn
    return decorate


def get(name: str) -> PassInfo:
    if name not in PASSES:
        raise PipelineError(f"unknown pass {name!r}; registered passes: {', '.join(sorted(PASSES))}")
    return PASSES[name]


def _coerce(pass_name: str, key: str, value: Any, kind: type) -> Any:
    if kind is str or isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value if kind is not str else str(value)
    try:
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if kind in (int, float) and isinstance(value, bool):  # rank=true is a typo, not rank=1
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise PipelineError(f"pass {pass_name!r}: option {key}={value!r} is not a valid {kind.__name__}") from None
