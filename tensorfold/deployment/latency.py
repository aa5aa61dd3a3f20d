"""The latency table: every candidate layer's original and replacements timed on the target.

Each candidate runs as a model of its own (the layer, or its factor chain) at the layer's real
input shape with batch 1, on the latency engine: onnxruntime on x86 (the fastest measured fp32
engine there), TVM in-process (`--engine tvm`, untuned unless the tuning database holds records),
or TVM over RPC for remote targets (under qemu the times are emulated). A layer's candidates are
timed interleaved (A B C A B C ...), each sample the median of enough back-to-back calls to last
about SAMPLE_MS (warm: the engine's threads are awake), and the median of ROUNDS samples is kept.
A layer whose samples scatter (IQR above NOISY_IQR of the median: a neighbour's load came and went) is
timed again, up to RETRIES times, keeping each candidate's lowest median (load only adds time); a
latency still that noisy is marked so in the table and the cache.
Whole models are timed as `tf.measure` times them (`end_to_end`: single calls, each after a 0.2 s
untimed pause), so the overhead (end to end minus the layers) holds what one call after idle costs
beyond its layers: on this machine about 0.25 ms, which dominates a model as small as digits. It is
timed in three blocks of BLOCK_ROUNDS (before, amid and after the layers) and the block with the lowest
median is kept: a neighbour's load only ever adds time, and one loaded block (55 ms against 18 ms for
ResNet-18 on digits, measured here) would otherwise become a fictitious overhead. A decision between two
whole models (the compressed model's share of the original's time; int8 against fp32) rests on their ratio
(`paired_ratio`): the median of the per-round ratios, with rounds added until its 95 % interval is within
RATIO_PRECISION (a 20-round ratio of medians once read 0.517 for a model at 0.575). Results are cached per (target,
engine, threads, layer kind + shape + attributes, replacement + ranks) in a JSON file under
`$TENSORFOLD_LATENCY_DIR`, else `$XDG_CACHE_HOME/tensorfold/latency`, else `~/.cache/tensorfold/latency`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from tensorfold.ir.errors import TensorfoldError
from tensorfold.ir.graph import Graph
from tensorfold.ir.onnx_graph import OnnxGraph
from tensorfold.ir.onnx_nodes import spec_nodes
from tensorfold.passes.progress import progress_bar
from tensorfold.runtime import ort_engine, tvm_engine
from tensorfold.runtime.engines import Runner
from tensorfold.runtime.timing import interleaved
from tensorfold.targets import Target

from .candidates import LayerCandidates

ROUNDS, WARMUP, SAMPLE_MS, GAP_S = 15, 3, 2.0, 0.002
NOISY_IQR, NOISE_FLOOR_MS, RETRIES = 0.25, 0.02, 2
END_TO_END_ROUNDS = 20
BLOCK_ROUNDS = 10  # the original end to end: three blocks of these, the one with the lowest median kept
# a ratio two models are compared by: blocks of END_TO_END_ROUNDS while its 95 % interval is wider than
# +-RATIO_PRECISION (relative), up to RATIO_MAX_ROUNDS
RATIO_PRECISION, RATIO_MAX_ROUNDS = 0.02, 80
ENGINES = (ort_engine.NAME, tvm_engine.LOCAL, tvm_engine.REMOTE)
OPSET = 17
# asking the tracker again for a device this process has just released: the server re-registers first
# (seconds under qemu on a loaded machine: 5 s was too short here)
RECONNECT_TIMEOUT = 60.0


def cache_dir() -> str:
    root = os.environ.get("TENSORFOLD_LATENCY_DIR")
    if root:
        return root
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "tensorfold", "latency")


class LatencyCache:
    """One JSON file per (target, engine, threads); entries keyed by layer + replacement."""

    def __init__(self, target: Target, engine: str, threads: int | None, directory: str | None = None,
                 emulated: bool = False):
        # emulated times (qemu) in a file of their own: never mixed with a real device's under the same key
        name = f"{target.key}-{engine}-t{threads or 'remote'}{'-emulated' if emulated else ''}.json"
        self.path = os.path.join(directory or cache_dir(), name)
        self.hits = self.misses = 0
        self.entries: dict[str, dict] = {}
        if os.path.isfile(self.path):
            try:
                with open(self.path) as f:
                    self.entries = json.load(f).get("entries", {})
            except (OSError, ValueError):
                self.entries = {}  # a damaged cache is re-measured, never trusted

    def get(self, key: str) -> dict | None:
        value = self.entries.get(key)
        if value is not None:
            self.hits += 1
        return value

    def put(self, values: dict[str, dict]) -> None:
        self.misses += len(values)
        self.entries.update(values)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        on_disk = {}
        if os.path.isfile(self.path):  # merge: another deploy may have written meanwhile
            try:
                with open(self.path) as f:
                    on_disk = json.load(f).get("entries", {})
            except (OSError, ValueError):
                on_disk = {}
        on_disk.update(self.entries)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"format": "tensorfold-latency/1", "entries": on_disk}, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


def layer_key(group: LayerCandidates) -> str:
    spec = group.original.specs[0]
    attrs = {k: getattr(spec, k) for k in ("kernel_size", "stride", "padding", "dilation", "groups")
             if hasattr(spec, k)}
    weight = np.asarray(spec.weight).shape
    return json.dumps({"kind": group.kind, "in": list(group.in_shape), "weight": list(weight),
                       "bias": getattr(spec, "bias", None) is not None, "transA": bool(group.facts.get("transA")),
                       **{k: _plain(v) for k, v in attrs.items()}}, sort_keys=True)


def entry_key(group: LayerCandidates, candidate) -> str:
    return f"{layer_key(group)} | {candidate.key}"


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.item() if hasattr(value, "item") else value


def chain_graph(specs, in_shape, name: str) -> OnnxGraph:
    """A model computing the spec chain alone, input `x` of `in_shape`."""
    nodes, inits, current = [], [], "x"
    for index, spec in enumerate(specs):
        out = "y" if index == len(specs) - 1 else f"t{index}"
        n, i = spec_nodes(spec, current, out, f"s{index}", len(in_shape))
        nodes += n
        inits += i
        current = out
    from tensorfold.ir.torch_modules import run_specs

    # the output's shape too: TVM's import (through onnxsim) refuses an output without one
    out_shape = list(np.shape(run_specs(list(specs), np.zeros(in_shape, np.float32))))
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = min(model.ir_version, 9)
    return OnnxGraph(model, name)


@dataclass
class LatencyEngine:
    """Prepares a graph as a Runner on the target: what every latency in a deploy is measured with."""

    name: str
    target: Target
    threads: int | None
    work_dir: str
    remote: object = None
    rpc_timeout: float = 5.0
    built: list[str] = field(default_factory=list)
    graphs: dict[str, Graph] = field(default_factory=dict)

    @property
    def emulated(self) -> bool:
        return bool(self.remote is not None and getattr(self.remote, "emulated", False))

    def prepare(self, graph: Graph, label: str) -> Runner:
        if self.name == ort_engine.NAME:
            return ort_engine.prepare(graph, self.threads)
        from tensorfold.build import build

        safe = hashlib.sha1(label.encode()).hexdigest()[:16]
        folder = os.path.join(self.work_dir, safe)
        if self.graphs.get(folder) is not graph:  # the same graph again (the original's end-to-end blocks): built once
            self.built.append(build(graph, self.target, folder, tune_trials=0, progress=False).path)
            self.graphs[folder] = graph  # held, so an id() in a label is never another graph's
        if self.name == tvm_engine.LOCAL:
            return tvm_engine.prepare_local(folder, self.threads)
        if self.remote.session is None:  # released for tf.measure: ask the tracker again
            self.remote = _connect(self.target, max(self.rpc_timeout, RECONNECT_TIMEOUT))
        return tvm_engine.prepare_remote(folder, self.remote)

    def release(self) -> None:
        """Drop the RPC session (its runners closed first): a device serves one session at a time, and
        tf.measure asks the tracker for its own. The next prepare asks again."""
        if self.remote is not None:
            self.remote.session = None
            import gc

            gc.collect()  # the session closes when its last module is collected; the server is then free


def open_engine(name: str, target: Target, threads: int, work_dir: str, rpc_timeout: float = 5.0) -> LatencyEngine:
    if target.placement.kind == "local":
        return LatencyEngine(name, target, threads, work_dir)
    return LatencyEngine(name, target, None, work_dir, _connect(target, rpc_timeout), rpc_timeout)


def _connect(target: Target, rpc_timeout: float):
    from tensorfold.targets.rpc import connect_direct, request_session

    placement = target.placement
    return (connect_direct(placement.host, placement.port, rpc_timeout) if placement.kind == "direct"
            else request_session(placement.host, placement.port, placement.key, rpc_timeout))


def _sampler(runner: Runner, shape) -> Callable[[], float]:
    """A timer whose one call runs the model n times back to back and returns the seconds per run."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    once = runner.timer({runner.input_names[0]: x})
    once()
    first = max(min(once() for _ in range(3)), 1e-7)
    repeats = max(1, min(1000, math.ceil(SAMPLE_MS / 1e3 / first)))

    def sample() -> float:  # the median of the run: robust to a neighbour's preemption on a shared machine
        return float(np.median([once() for _ in range(repeats)]))
    return sample


def noisy(timing: dict) -> bool:
    """Samples too scattered to trust: the machine's load changed while they were taken."""
    return timing["iqr_ms"] > max(NOISY_IQR * timing["median_ms"], NOISE_FLOOR_MS)


def time_runners(runners: list[tuple[Runner, tuple[int, ...]]]) -> list[dict]:
    timers = [_sampler(r, shape) for r, shape in runners]
    timings = interleaved(timers, ROUNDS, WARMUP, gap_s=GAP_S)
    return [t.to_json() for t in timings]


def measure_groups(groups: list[LayerCandidates], engine: LatencyEngine, cache: LatencyCache,
                   progress: bool) -> None:
    """Fill latency_ms / iqr_ms of every candidate, from the cache or measured (interleaved per layer)."""
    with progress_bar(f"latency table ({engine.name} on {engine.target.name})", len(groups), progress) as advance:
        for group in groups:
            missing = []
            for candidate in group.candidates:
                hit = cache.get(entry_key(group, candidate))
                if hit is None:
                    missing.append(candidate)
                else:
                    candidate.latency_ms, candidate.iqr_ms, candidate.cached = hit["median_ms"], hit["iqr_ms"], True
                    candidate.emulated = bool(hit.get("emulated", engine.emulated))
                    candidate.noisy = bool(hit.get("noisy", False))
            if missing:
                runners = [(engine.prepare(chain_graph(c.specs, group.in_shape, f"{group.layer}:{c.key}"),
                                           f"{entry_key(group, c)}"), group.in_shape) for c in missing]
                try:
                    timings = time_runners(runners)
                    for _ in range(0 if engine.emulated else RETRIES):  # qemu: slow, and not device times anyway
                        if not any(noisy(t) for t in timings):
                            break
                        again = time_runners(runners)  # the whole layer again, still interleaved
                        timings = [min(a, b, key=lambda t: t["median_ms"]) for a, b in zip(timings, again)]
                finally:
                    for runner, _ in runners:
                        runner.close()
                for candidate, timing in zip(missing, timings):
                    candidate.latency_ms, candidate.iqr_ms = timing["median_ms"], timing["iqr_ms"]
                    candidate.emulated = engine.emulated
                    candidate.noisy = noisy(timing)
                cache.put({entry_key(group, c): {**t, "engine": engine.name, "emulated": engine.emulated,
                                                 "noisy": c.noisy, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
                           for c, t in zip(missing, timings)})
            advance()


def end_to_end(graphs: dict[str, Graph], engine: LatencyEngine, rounds: int = END_TO_END_ROUNDS,
               warm: bool = False, ratio: tuple[str, str] | None = None,
               max_rounds: int = RATIO_MAX_ROUNDS) -> dict[str, dict]:
    """Whole models timed interleaved on the latency engine (batch as captured).

    Default: as `tf.measure` times them, single calls each after an untimed GAP pause (what one
    inference after idle costs, the figure the verdict checks). warm=True: like the layers, each sample
    the median of back-to-back calls (steady state). ratio=(base, other): the result's "ratio" holds
    `paired_ratio` of other to base, timed in blocks of `rounds` until it is precise (see
    RATIO_PRECISION) or `max_rounds` were timed."""
    from tensorfold.runtime.timing import GAP_S as MEASURE_GAP_S, Timing

    runners = {}
    try:
        for name, graph in graphs.items():
            runners[name] = engine.prepare(graph, f"end-to-end {name} {id(graph)}")
        shapes = {name: tuple(g.inputs[0].shape) for name, g in graphs.items()}
        measured = None
        if warm:
            timers = [_sampler(r, shapes[n]) for n, r in runners.items()]
            timings = interleaved(timers, rounds, WARMUP, gap_s=GAP_S)
        else:
            timers = []
            for name, runner in runners.items():
                x = np.random.default_rng(0).standard_normal(shapes[name]).astype(np.float32)
                timers.append(runner.timer({runner.input_names[0]: x}))
            for _ in range(WARMUP):
                for timer in timers:
                    timer()
            samples = {name: [] for name in runners}
            block = rounds
            while True:
                for _ in range(block):
                    for name, timer in zip(runners, timers):
                        time.sleep(MEASURE_GAP_S)
                        samples[name].append(timer() * 1e3)
                if ratio is None:
                    break
                measured = paired_ratio(samples[ratio[0]], samples[ratio[1]])
                if measured["precision"] <= RATIO_PRECISION or measured["rounds"] >= max_rounds:
                    break
                block = min(rounds, max_rounds - measured["rounds"])
            timings = [Timing(samples[name]) for name in runners]
        result = {name: {**t.to_json(), "emulated": engine.emulated} for name, t in zip(runners, timings)}
        if measured is not None:
            result["ratio"] = {"of": f"{ratio[1]} / {ratio[0]}", **measured}
        return result
    finally:
        for runner in runners.values():
            runner.close()


def paired_ratio(base_ms, other_ms) -> dict:
    """other / base from samples timed in the same rounds: the median of the per-round ratios (a load that
    slows a round slows both of its calls) and its distribution-free 95 % interval (the order statistics
    n/2 -+ 0.98 sqrt(n) of the sorted ratios); precision: the interval's half width over the median."""
    ratios = np.sort(np.asarray(other_ms, dtype=float) / np.asarray(base_ms, dtype=float))
    n = ratios.size
    k = max(int(math.floor((n - 1.96 * math.sqrt(n)) / 2)), 0)
    median, low, high = float(np.median(ratios)), float(ratios[k]), float(ratios[n - 1 - k])
    return {"median": round(median, 4), "low": round(low, 4), "high": round(high, 4),
            "precision": round((high - low) / 2 / median, 4), "rounds": int(n)}


def cached_end_to_end(graphs: dict[str, Graph], engine: LatencyEngine, cache: LatencyCache,
                      key: str, ratio: tuple[str, str] | None = None) -> tuple[dict[str, dict], bool]:
    """`end_to_end` of `graphs` (single calls after a pause), or the timings an earlier deploy stored under
    `key` for the same models timed together: a second deploy measures nothing twice and decides what the
    first decided (an int8 gain within the noise once flipped the recipe of a resumed deploy).
    Returns the timings and whether they came from the cache."""
    hit = cache.get(key)
    if hit is not None and all(name in hit for name in graphs) and (ratio is None or "ratio" in hit):
        return {name: hit[name] for name in (*graphs, *(["ratio"] if ratio else []))}, True
    timed = end_to_end(graphs, engine, ratio=ratio)
    cache.put({key: {**timed, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}})
    return timed, False


def check_engine(name: str, target: Target) -> str:
    """The latency engine for `target`: onnxruntime by default on a local CPU, TVM over RPC on a remote one."""
    remote = target.placement.kind != "local"
    if name is None:
        return tvm_engine.REMOTE if remote else (tvm_engine.LOCAL if target.device != "cpu" else ort_engine.NAME)
    name = {"tvm": tvm_engine.LOCAL if not remote else tvm_engine.REMOTE}.get(name, name)
    allowed = [tvm_engine.REMOTE] if remote else ([tvm_engine.LOCAL] if target.device != "cpu"
                                                  else [ort_engine.NAME, tvm_engine.LOCAL])
    if name not in allowed:
        raise TensorfoldError(f"deploy: engine {name!r} cannot time layers on {target.name}; "
                              f"use {' or '.join(allowed)}")
    return name
