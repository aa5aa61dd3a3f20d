"""One interface for every engine: prepare a model once, then run it and time it.

An engine's `prepare(...)` returns a Runner: calling it with {input name: array} gives
{output name: array} computed by that engine; `timer(inputs)` gives a function that runs
once on inputs already placed on the device and returns the seconds it took.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from tensorfold.ir.errors import TensorfoldError

Inputs = Mapping[str, np.ndarray]
Outputs = dict[str, np.ndarray]


class EngineUnavailable(TensorfoldError):
    """This engine cannot run this candidate on this target (the reason is the message)."""


class EngineFailed(TensorfoldError):
    """An engine broke while running (a remote server died, a runtime error)."""


@dataclass
class Runner:
    """A prepared model on one engine. `threads`: the thread count it runs with (None: the remote's default)."""

    engine: str
    run: Callable[[Inputs], Outputs]
    make_timer: Callable[[Inputs], Callable[[], float]]
    input_names: list[str]
    input_shapes: dict[str, tuple[int, ...]]
    threads: int | None
    emulated: bool = False
    close: Callable[[], None] = lambda: None
    details: dict[str, Any] = field(default_factory=dict)

    def __call__(self, inputs: Inputs) -> Outputs:
        return self.run(inputs)

    def timer(self, inputs: Inputs) -> Callable[[], float]:
        return self.make_timer(inputs)

    @property
    def batch(self) -> int:
        return int(self.input_shapes[self.input_names[0]][0])


def default_threads() -> int:
    """One thread per physical core (SMT siblings slow conv kernels down); TVM_NUM_THREADS wins."""
    if os.environ.get("TVM_NUM_THREADS"):
        return int(os.environ["TVM_NUM_THREADS"])
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def tvm_threads_default() -> int:
    """Size TVM's CPU thread pool to the physical cores, unless TVM_NUM_THREADS says otherwise; returns it.

    Without TVM_NUM_THREADS, TVM's pool takes half of `hardware_concurrency()` on x86 (it assumes two SMT
    threads per core). On a VM whose vCPUs are whole cores that halves the threads: on these 2-vCPU
    machines `runtime.NumThreads()` is 1, and every tuned kernel ran on one core. The pool reads the
    variable once, when it starts, so this is called before TVM runs anything parallel (tuning, loading
    an artifact)."""
    os.environ.setdefault("TVM_NUM_THREADS", str(default_threads()))
    return int(os.environ["TVM_NUM_THREADS"])


def onnx_bytes(graph) -> bytes:
    """The candidate as a serialized ONNX model (a torch graph exported first), for the engines that load ONNX."""
    if graph is None:
        raise EngineUnavailable("an artifact alone has no ONNX model")
    try:
        to_onnx = getattr(graph, "to_onnx", None)
        if to_onnx is not None:
            return to_onnx().SerializeToString()
        with tempfile.TemporaryDirectory(prefix="tensorfold-onnx-") as tmp:
            path = os.path.join(tmp, "model.onnx")
            graph.save(path)
            with open(path, "rb") as f:
                return f.read()
    except Exception as e:  # noqa: BLE001
        raise EngineUnavailable(f"{graph.source}: export to ONNX failed: {e}") from e
