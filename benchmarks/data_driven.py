"""Data-driven compression on trained tasks: test accuracy before fine-tuning at equal compression.

For each trained task (`tensorfold tasks`) and two compression levels (mild: ratio 2, aggressive:
ratio 4; the FLOPs each variant reaches are printed, since the methods touch different layers):
svd / tucker2 / cp on the weights and with data=true (Sigma-norm), lowrank_sparse and alds at the
same level. Per variant: test accuracy (no fine-tuning), params and FLOPs ratios against the
BN-folded original, compression time, and latency on x86 measured side by side with the original in
one run (torch, onnxruntime, OpenVINO when installed, TVM; TVM tuned with --tune-trials per
candidate, 0 = untuned).

    python benchmarks/data_driven.py                                   # digits, mnist1d-cnn, mnist1d-mlp
    python benchmarks/data_driven.py --tasks resnet18-digits --latency off
    python benchmarks/data_driven.py --tasks digits --tune-trials 64 --report dd.json
    python benchmarks/data_driven.py --tasks resnet18-digits --keep out/dd   # resumable; reruns reuse the models

Calibration: the task's calibration split (training images; the test split stays held out).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

import tensorfold as tf
from tensorfold.models import resolve
from tensorfold.runtime.evaluate import predict
from tensorfold.runtime.tasks import get_task
from tensorfold.targets.registry import host_cpu

LEVELS = {"mild": 2, "aggressive": 4}


# engines whose latency lands in the rows (when measured), with their short table headers
ENGINE_COLUMNS = {"torch": "torch", "onnxruntime": "ort", "openvino": "ov", "openvino-fp32": "ov-f32", "tvm": "tvm"}


def variants(rate: float) -> list[tuple[str, str]]:
    """(label, pipeline after fold_bn) at one compression rate."""
    fraction = 1.0 / rate
    return [
        ("svd", f"svd(ratio={rate})"), ("svd+data", f"svd(ratio={rate}, data=true)"),
        ("tucker2", f"tucker2(ratio={rate})"), ("tucker2+data", f"tucker2(ratio={rate}, data=true)"),
        ("cp", f"cp(ratio={rate * 2})"), ("cp+data", f"cp(ratio={rate * 2}, data=true)"),
        ("lowrank_sparse", f"lowrank_sparse(ratio={rate})"),
        ("alds", f"alds(budget=flops:{fraction:g})"),
        ("tucker2 budget", f"tucker2(budget=flops:{fraction:g})"),
        ("svd budget", f"svd(budget=flops:{fraction:g})"),
    ]


def run_task(name: str, levels: list[str], latency: bool, tune_trials: int, rounds: int, work: str,
             only: list[str] | None, engines: list[str] | None = None, keep: str | None = None) -> list[dict]:
    task = get_task(name)
    graph, _ = tf.compress(resolve(name), "fold_bn")
    calibration = task.calibration_data()
    images, labels = task.test_data()

    def score(g) -> float:
        return float(task.evaluate(predict(g, images), labels)[task.metric])

    base_flops, base_params = graph.layer_cost().flops, graph.total_params()
    rows = [{"task": name, "level": "-", "variant": "original", "pipeline": "fold_bn", task.metric: score(graph),
             "flops_x": 1.0, "params_x": 1.0, "seconds": 0.0}]
    candidates = {"original": graph}
    for level in levels:
        for label, pipeline in variants(LEVELS[level]):
            if only and label not in only:
                continue
            kept = _kept(keep, name, level, label)
            if kept is not None:  # compressed by an earlier run: its model and row, nothing recomputed
                candidates[f"{level} {label}"], row = kept
                rows.append(row)
                print(f"  {name:16s} {level:10s} {label:15s} kept from {keep}", file=sys.stderr)
                continue
            started = time.perf_counter()
            try:
                compressed, report = tf.compress(graph, pipeline, calibration=calibration, progress=sys.stderr.isatty())
            except tf.TensorfoldError as e:
                rows.append({"task": name, "level": level, "variant": label, "pipeline": pipeline, "error": str(e)})
                print(f"  {name} {level} {label}: {e}", file=sys.stderr)
                continue
            seconds = time.perf_counter() - started
            if not report.passes[-1].changed:  # e.g. tucker2 on an MLP: no layer it applies to
                rows.append({"task": name, "level": level, "variant": label, "pipeline": pipeline,
                             "error": "no layer this method applies to"})
                continue
            row = {"task": name, "level": level, "variant": label, "pipeline": pipeline, task.metric: score(compressed),
                   "flops_x": base_flops / max(compressed.layer_cost().flops, 1),
                   "params_x": base_params / max(compressed.total_params(), 1), "seconds": round(seconds, 2),
                   "layers": len(report.passes[-1].changed)}
            rows.append(row)
            candidates[f"{level} {label}"] = compressed
            if keep:
                _keep(keep, name, level, label, compressed, row)
            print(f"  {name:16s} {level:10s} {label:15s} {task.metric} {row[task.metric]:.4f}  "
                  f"FLOPs {row['flops_x']:.2f}x  params {row['params_x']:.2f}x  {seconds:.1f} s", file=sys.stderr)
    if latency:
        measured = tf.measure(candidates, "x86", data=(images, labels), tune_trials=tune_trials, rounds=rounds,
                              work_dir=os.path.join(work, name), progress=sys.stderr.isatty(), strict=False,
                              engines=engines)
        medians = {(r["candidate"], r["engine"]): r["latency"]["median_ms"] for r in measured.rows if r.get("latency")}
        for row in rows:
            key = "original" if row["variant"] == "original" else f"{row['level']} {row['variant']}"
            for engine in ENGINE_COLUMNS:
                ms, base = medians.get((key, engine)), medians.get(("original", engine))
                if ms is not None and base:
                    row[f"{engine}_ms"] = round(ms, 4)
                    row[f"{engine}_speedup"] = round(base / ms, 3)
    return rows


def _kept_path(keep: str, name: str, level: str, label: str) -> str:
    return os.path.join(keep, f"{name}-{level}-{label}")


def _keep(keep: str, name: str, level: str, label: str, graph, row: dict) -> None:
    os.makedirs(keep, exist_ok=True)
    path = _kept_path(keep, name, level, label)
    graph.save(path + ".onnx")
    with open(path + ".json", "w") as f:  # written last: a model without its row is compressed again
        json.dump(row, f, indent=2)


def _kept(keep: str | None, name: str, level: str, label: str):
    path = _kept_path(keep, name, level, label) if keep else None
    if not path or not (os.path.exists(path + ".json") and os.path.exists(path + ".onnx")):
        return None
    with open(path + ".json") as f:
        return tf.load(path + ".onnx"), json.load(f)


def print_table(rows: list[dict], tune_trials: int) -> None:
    metric = next(k for k in rows[0] if k in ("top1", "psnr"))
    head = ["task", "level", "variant", metric, "FLOPs", "params", "time s"]
    head += [f"{ENGINE_COLUMNS[e]} {unit}" for e in ENGINE_COLUMNS if e != "torch" for unit in ("ms", "x")]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        if "error" in row:
            print(f"| {row['task']} | {row['level']} | {row['variant']} | skipped: {row['error'][:80]} |")
            continue
        cells = [row["task"], row["level"], row["variant"], f"{row.get(metric, float('nan')):.4f}",
                 f"{row['flops_x']:.2f}x", f"{row['params_x']:.2f}x", f"{row['seconds']:.1f}"]
        for engine in (e for e in ENGINE_COLUMNS if e != "torch"):
            cells += [f"{row.get(f'{engine}_ms', float('nan')):.3f}", f"{row.get(f'{engine}_speedup', float('nan')):.2f}"]
        print("| " + " | ".join(cells) + " |")
    print(f"\nCPU: {host_cpu()}; TVM tuning budget: {tune_trials} trials per candidate "
          f"({'untuned' if not tune_trials else 'MetaSchedule'}); accuracy before any fine-tuning.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="digits,mnist1d-cnn,mnist1d-mlp")
    parser.add_argument("--levels", default="mild,aggressive", help="mild (ratio 2), aggressive (ratio 4)")
    parser.add_argument("--variants", help="only these variant labels, comma-separated (e.g. svd,svd+data)")
    parser.add_argument("--latency", choices=("on", "off"), default="on")
    parser.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule trials per TVM build (0: untuned)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--engines", help="x86 engines to time, comma-separated (default: all installed, e.g. "
                        "torch,onnxruntime,tvm)")
    parser.add_argument("--keep", metavar="DIR", help="save each compressed model (ONNX) and its row here, and "
                        "reuse what an earlier run saved: an interrupted run resumes, a latency run recompresses "
                        "nothing")
    parser.add_argument("--report", help="write the rows as JSON here")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    levels = [l for l in args.levels.split(",") if l]
    unknown = [l for l in levels if l not in LEVELS]
    if unknown:
        parser.error(f"unknown level(s) {unknown}; known: {list(LEVELS)}")
    work = tempfile.mkdtemp(prefix="tensorfold-data-driven-")
    rows = []
    for name in [t for t in args.tasks.split(",") if t]:
        rows += run_task(name, levels, args.latency == "on", args.tune_trials, args.rounds, work,
                         args.variants.split(",") if args.variants else None,
                         args.engines.split(",") if args.engines else None, args.keep)
    print_table(rows, args.tune_trials)
    if args.report:
        with open(args.report, "w") as f:
            json.dump({"cpu": host_cpu(), "threads": os.environ.get("TVM_NUM_THREADS"), "tune_trials": args.tune_trials,
                       "rows": rows}, f, indent=2, default=float)
        print(f"wrote {args.report}")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
