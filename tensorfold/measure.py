"""`tf.measure`: candidates x engines x targets, timed interleaved, accuracy from each engine's own outputs.

Per target: build what is not built yet, prepare every engine the target offers (this
machine: torch eager, onnxruntime, TVM, and on x86 OpenVINO when its extra is installed; a remote
device: TVM over RPC) or those of them named in `engines`, run the evaluation
data through each (accuracy and fidelity come from those outputs), then time all runners
in interleaved rounds. A target that fails (a server dying mid-measure) is recorded with
what was completed; the other targets' results stay in the report.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from tensorfold.ir import Graph
from tensorfold.ir.errors import TensorfoldError
from tensorfold.passes.progress import progress_bar
from tensorfold.runtime import accuracy as acc
from tensorfold.runtime import openvino_engine, ort_engine, torch_engine, tvm_engine
from tensorfold.runtime.datasets import load_data
from tensorfold.runtime.engines import EngineFailed, EngineUnavailable, Runner, default_threads
from tensorfold.runtime.measure_report import FAILED, OK, UNAVAILABLE, MeasureReport
from tensorfold.runtime.timing import GAP_S, interleaved
from tensorfold.targets import Artifact, Target, get_target
from tensorfold.targets.registry import host_cpu
from tensorfold.targets.rpc import RpcError, connect_direct, placed, request_session

HOST_ENGINES = (torch_engine.NAME, ort_engine.NAME, tvm_engine.LOCAL)
ENGINES = HOST_ENGINES + openvino_engine.ENGINES + (tvm_engine.REMOTE,)


class MeasureError(TensorfoldError):
    """A target failed during a measure; `.report` holds every result obtained (other targets included)."""

    def __init__(self, message: str, report: MeasureReport):
        super().__init__(message)
        self.report = report


@dataclass
class Candidate:
    name: str
    graph: Graph | None
    artifacts: dict[str, str] = field(default_factory=dict)  # target name -> artifact folder

    @property
    def input_shape(self) -> tuple[int, ...]:
        if self.graph is not None:
            return tuple(self.graph.inputs[0].shape)
        manifest = Artifact.open(next(iter(self.artifacts.values()))).manifest
        return tuple(manifest["inputs"][0]["shape"])


def measure(candidates: Any, targets: str | Target | Sequence[str | Target], data: Any = None, rounds: int = 20,
            warmup: int = 3, tune_trials: int = 0, evaluator: Callable[[np.ndarray, np.ndarray], dict] | None = None,
            report: str | os.PathLike | None = None, passes: str | None = None,
            rpc_tracker: str | None = None, rpc_key: str | None = None, rpc_timeout: float = 5.0,
            work_dir: str | os.PathLike | None = None, threads: int | None = None, limit: int | None = None,
            random_samples: int = 8, progress: bool = True, strict: bool = True,
            calibration: Any = None, train_data: Any = None, engines: Sequence[str] | None = None) -> MeasureReport:
    """Measure latency and accuracy of every candidate on every engine of every target.

    candidates: a model or a list of them (a Graph, an .onnx path, `torchvision:<arch>`, a factory
    `pkg.mod:fn`, a task name such as `digits`, or an artifact folder), or (name, model) pairs / a {name: model} dict;
    the first is the original that fidelity is measured against. passes: also measure each
    graph compressed with this pipeline (calibrated on `calibration`, trained on `train_data` by
    finetune / musco steps, see tf.compress). data: a task name (its test set), an ImageFolder directory, (images,
    labels), or None (random inputs: fidelity only). evaluator: callable(outputs, labels) -> dict,
    called with each engine's outputs. engines: measure only these (names in ENGINES) where a target
    offers them; None: every engine each target offers (OpenVINO's on x86 when installed).
    rpc_tracker "HOST:PORT" + rpc_key: where remote targets (arm64, android-arm64) run; "direct:HOST:PORT"
    connects to one server. Raises MeasureError (its `.report` kept, and saved when `report` is given)
    when a target failed, unless strict=False.
    """
    chosen = _chosen_engines(engines)
    threads = threads or default_threads()
    # TVM sizes its thread pool on first use from this variable: same count as torch and onnxruntime.
    os.environ.setdefault("TVM_NUM_THREADS", str(threads))
    threads = int(os.environ["TVM_NUM_THREADS"])
    target_list = [placed(get_target(t), rpc_tracker, rpc_key) for t in
                   ([targets] if isinstance(targets, (str, Target)) else list(targets))]
    pool = _candidates(candidates, passes, progress, calibration, train_data)
    shape = pool[0].input_shape
    if data is not None:
        images, labels, data_name = load_data(data, shape, limit)
    else:
        rng = np.random.default_rng(0)
        images = rng.standard_normal((random_samples * shape[0], *shape[1:])).astype(np.float32)
        labels, data_name = None, f"{len(images)} random inputs (fidelity only)"
    work = os.fspath(work_dir) if work_dir else tempfile.mkdtemp(prefix="tensorfold-measure-")
    result = MeasureReport(settings={
        "machine": host_cpu(), "rounds": rounds, "warmup": warmup, "threads": threads, "data": data_name,
        "samples": int(len(images)),
        "tune_trials": tune_trials, "targets": [t.name for t in target_list], "work_dir": work,
        "engines": {t.name: _engines(t, chosen) for t in target_list},
        "candidates": [c.name for c in pool], "interleaved": f"every runner once per round, per target, {GAP_S} s untimed pause between runners",
        "reference": None})
    outputs: dict[tuple[str, str, str], np.ndarray] = {}
    for target in target_list:
        _measure_target(result, outputs, pool, target, _engines(target, chosen), images, labels, evaluator, rounds,
                        warmup, tune_trials, work, threads, rpc_timeout, progress)
    _add_fidelity(result, outputs, pool[0].name)
    if report is not None:
        result.save(os.fspath(report))
    if result.errors and strict:
        raise MeasureError("; ".join(f"{e['message']} (completed: {e['completed']})"
                                     for e in result.errors), result)
    return result


# ---- candidates and targets ------------------------------------------------------------------

def _candidates(candidates: Any, passes: str | None, progress: bool, calibration: Any = None,
                train_data: Any = None) -> list[Candidate]:
    if isinstance(candidates, dict):
        items = list(candidates.items())
    elif isinstance(candidates, (list, tuple)) and not _is_pair(candidates):
        items = [c if _is_pair(c) else (None, c) for c in candidates]
    else:
        items = [candidates if _is_pair(candidates) else (None, candidates)]
    pool: list[Candidate] = []
    for index, (name, model) in enumerate(items):
        candidate = _candidate(model, name or ("original" if index == 0 else f"candidate{index}"))
        if any(c.name == candidate.name for c in pool):
            candidate.name = f"{candidate.name}#{index}"
        pool.append(candidate)
        if passes and candidate.graph is not None:
            import tensorfold as tf

            compressed, _ = tf.compress(candidate.graph, passes, calibration=calibration, progress=progress,
                                        train_data=train_data)
            pool.append(Candidate(f"{candidate.name} + {passes}", compressed))
    if not pool:
        raise TensorfoldError("measure: no candidates given")
    return pool


def _is_pair(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) and not isinstance(value[1], str)


def _candidate(model: Any, name: str) -> Candidate:
    if isinstance(model, Candidate):  # a graph with its artifacts already built (deploy's result)
        return model
    if isinstance(model, Graph):
        return Candidate(name, model)
    if isinstance(model, Artifact):
        return Candidate(name, None, {model.target_name: model.path})
    text = os.fspath(model)
    if os.path.isdir(text):
        artifact = Artifact.open(text)
        return Candidate(name if name != "original" else os.path.basename(artifact.path.rstrip("/")) or name,
                         None, {artifact.target_name: artifact.path})
    from tensorfold.models import resolve

    return Candidate(name, resolve(text))


def _chosen_engines(engines: Sequence[str] | None) -> list[str] | None:
    if engines is None:
        return None
    chosen = [engines] if isinstance(engines, str) else list(engines)
    unknown = [e for e in chosen if e not in ENGINES]
    if unknown or not chosen:
        raise TensorfoldError(f"measure: unknown engine(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                              f"known: {', '.join(ENGINES)}")
    if any(e in openvino_engine.ENGINES for e in chosen):
        openvino_engine.require()  # named but not installed: say which extra, before anything is built
    return chosen


def _offered(target: Target) -> list[str]:
    if target.placement.kind != "local":
        return [tvm_engine.REMOTE]
    if target.device != "cpu":
        return [tvm_engine.LOCAL]
    return list(HOST_ENGINES) + (list(openvino_engine.ENGINES) if target.name.split(":")[0] == "x86" else [])


def _engines(target: Target, chosen: list[str] | None = None) -> list[str]:
    """The engines measured on `target`: those chosen that it offers, or by default all it offers
    (OpenVINO's only where the package is installed)."""
    offered = _offered(target)
    if chosen is not None:
        return [e for e in offered if e in chosen]
    return [e for e in offered if e not in openvino_engine.ENGINES or openvino_engine.available()]


# ---- one target ------------------------------------------------------------------------------

def _measure_target(result: MeasureReport, outputs: dict, pool: list[Candidate], target: Target, engines: list[str],
                    images: np.ndarray, labels: np.ndarray | None, evaluator, rounds: int, warmup: int,
                    tune_trials: int, work: str, threads: int, rpc_timeout: float, progress: bool) -> None:
    rows = {(c.name, e): result.add(c.name, e, target.name, UNAVAILABLE) for c in pool for e in engines}
    completed: list[str] = []
    runners: list[tuple[Candidate, str, Runner]] = []
    remote = None
    try:
        if tvm_engine.REMOTE in engines:
            remote = _open_remote(target, rpc_timeout)  # an unreachable tracker fails before minutes of building
            completed.append(f"session with {remote.host}:{remote.port}")
        for candidate in pool if any(e.startswith("tvm") for e in engines) else []:
            _ensure_built(candidate, target, work, tune_trials, progress, rows)
        for candidate in pool:
            for engine in engines:
                row = rows[(candidate.name, engine)]
                if row.get("reason"):
                    continue
                try:
                    runner = _prepare(engine, candidate, target, threads, remote)
                except EngineUnavailable as e:
                    row["reason"] = str(e)
                    continue
                row.update(status=OK, threads=runner.threads, emulated=runner.emulated, **runner.details)
                runners.append((candidate, engine, runner))
        with progress_bar(f"outputs on {target.name}", len(runners), progress) as advance_outputs:
            for candidate, engine, runner in runners:
                logits = acc.outputs_on(runner, images)
                advance_outputs()
                _record_outputs(rows[(candidate.name, engine)], outputs, candidate, engine, target, logits, labels,
                                evaluator)
                completed.append(f"outputs of {candidate.name}/{engine}")
        if runners:
            timers = [runner.timer({runner.input_names[0]: images[:runner.batch]}) for _, _, runner in runners]
            done = {"rounds": 0}
            with progress_bar(f"timing {len(runners)} runners on {target.name}, interleaved", rounds,
                              progress) as advance_rounds:
                def on_round(count: int) -> None:
                    done.update(rounds=count)
                    advance_rounds()

                timings = interleaved(timers, rounds, warmup, on_round=on_round)
            for (candidate, engine, _), timing in zip(runners, timings):
                rows[(candidate.name, engine)]["latency"] = timing.to_json()
            completed.append(f"{rounds} timing rounds")
    except (RpcError, EngineFailed) as e:
        rounds_done = locals().get("done", {}).get("rounds")
        if rounds_done is not None and f"{rounds} timing rounds" not in completed:
            completed.append(f"{rounds_done} of {rounds} timing rounds")
        for row in rows.values():
            if row["status"] == OK and "latency" not in row:
                row.update(status=FAILED, reason=f"{target.name} failed: {e}")
        result.errors.append({"target": target.name, "message": f"{target.name}: {e}",
                              "completed": ", ".join(completed) or "nothing"})
    finally:
        for _, _, runner in runners:
            runner.close()
        if remote is not None:
            remote.session = None  # drop the session: the server frees the device for the next client


def _record_outputs(row: dict, outputs: dict, candidate: Candidate, engine: str, target: Target,
                    logits: np.ndarray, labels: np.ndarray | None, evaluator) -> None:
    outputs[(candidate.name, engine, target.name)] = logits
    if labels is not None:
        if labels.dtype.kind in "iu":  # class labels; float targets are scored by the evaluator alone
            row["accuracy"] = acc.classification(logits, labels)
        if evaluator is not None:
            row["evaluator"] = {k: _plain(v) for k, v in dict(evaluator(logits, labels)).items()}


def _ensure_built(candidate: Candidate, target: Target, work: str, tune_trials: int, progress: bool,
                  rows: dict) -> None:
    if target.name in candidate.artifacts:
        return
    if candidate.graph is None:
        built_for = ", ".join(candidate.artifacts)
        for (name, engine), row in rows.items():
            if name == candidate.name and engine.startswith("tvm"):
                row["reason"] = f"an artifact built for {built_for}, not {target.name} (give the model to rebuild)"
        return
    from tensorfold.build import build

    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in candidate.name)
    out = os.path.join(work, safe, target.key)
    candidate.artifacts[target.name] = build(candidate.graph, target, out, tune_trials=tune_trials,
                                             progress=progress).path


def _open_remote(target: Target, timeout: float):
    placement = target.placement
    if placement.kind == "direct":
        return connect_direct(placement.host, placement.port, timeout)
    return request_session(placement.host, placement.port, placement.key, timeout)


def _prepare(engine: str, candidate: Candidate, target: Target, threads: int, remote) -> Runner:
    if engine == torch_engine.NAME:
        return torch_engine.prepare(candidate.graph, threads)
    if engine == ort_engine.NAME:
        return ort_engine.prepare(candidate.graph, threads)
    if engine in openvino_engine.ENGINES:
        return openvino_engine.prepare(candidate.graph, threads, engine)
    artifact = candidate.artifacts.get(target.name)
    if artifact is None:
        raise EngineUnavailable(f"{candidate.name} has no artifact for {target.name}")
    if engine == tvm_engine.LOCAL:
        return tvm_engine.prepare_local(artifact, threads)
    return tvm_engine.prepare_remote(artifact, remote)


def _add_fidelity(result: MeasureReport, outputs: dict, original: str) -> None:
    """Fidelity to the original's outputs on the first engine that ran it (torch on the host, usually)."""
    reference_key = next((k for k in outputs if k[0] == original), None)
    if reference_key is None:
        return
    reference = outputs[reference_key]
    result.settings["reference"] = "/".join(reference_key)
    for (candidate, engine, target), values in outputs.items():
        result.row(candidate, engine, target)["fidelity"] = acc.fidelity(values, reference)


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
