"""fp32 vs int8, side by side in one run: the digits CNN and ResNet-18 (224, batch 1) on x86.

For each model: file sizes (ONNX fp32, QDQ int8), accuracy (digits: its held-out test split;
ResNet-18 has random weights, so fidelity to fp32 instead), and the median latency on
onnxruntime, TVM (untuned, or tuned with --tune-trials) and, where the `openvino` extra is installed,
OpenVINO (f32 and its default precision; it runs the QDQ graph in int8), with int8/fp32 ratios. torch
eager runs the fp32 graph only (the int8 graph is ONNX: "not supported" there).

    python benchmarks/quantize.py                       # untuned TVM, ~5 min on 2 cores
    python benchmarks/quantize.py --tune-trials 256     # tuned (one database per target, reused)
    python benchmarks/quantize.py --models digits --rounds 5   # smoke run
    python benchmarks/quantize.py --models resnet18 --weights planted \
        --passes "fold_bn, tucker2(rank=evbmf)" --tune-trials 300   # factorized, then int8

--passes is the pipeline both candidates run before int8 (default fold_bn); --weights planted
gives each conv the low-rank structure of decompose.py, so EVBMF has something to find.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile

import numpy as np
import torch
import torchvision
from decompose import plant_low_rank

import tensorfold as tf
from tensorfold.models import resolve

CALIBRATION_BATCHES = 8


def _graphs(model: str, size: int, passes: str, weights: str):
    if model == "digits":
        graph = resolve("digits", None, None)
        calibration, data = "digits", "digits"
    else:
        if weights == "planted":  # latency does not depend on the weights; EVBMF's ranks do
            module = torchvision.models.get_model(model, weights=None).eval()
            plant_low_rank(module)
            graph = tf.capture(module, torch.randn(1, 3, size, size), source=f"torchvision:{model} (planted)")
        else:
            graph = resolve(f"torchvision:{model}", (1, 3, size, size), None)
        rng = np.random.default_rng(0)  # random weights: calibrate on inputs of the right statistics
        calibration = [rng.standard_normal((4, 3, size, size)).astype(np.float32) for _ in range(CALIBRATION_BATCHES)]
        data = None
    fp32, _ = tf.compress(graph, passes)
    int8, report = tf.compress(fp32, "int8", calibration=calibration)
    return fp32, int8, report, data


def _size(graph, work: str, name: str) -> int:
    path = os.path.join(work, f"{name}.onnx")
    graph.save(path)
    return os.path.getsize(path)


def run(model: str, size: int, tune_trials: int, rounds: int, warmup: int, work: str,
        passes: str = "fold_bn", weights: str = "random") -> None:
    fp32, int8, report, data = _graphs(model, size, passes, weights)
    sizes = {"fp32": _size(fp32, work, f"{model}_fp32"), "int8": _size(int8, work, f"{model}_int8")}
    result = tf.measure({"fp32": fp32, "int8": int8}, "x86", data=data, rounds=rounds, warmup=warmup,
                        tune_trials=tune_trials, work_dir=os.path.join(work, model), progress=tune_trials > 0,
                        random_samples=4, strict=False)
    rows = {(r["candidate"], r["engine"]): r for r in result.rows}
    print(f"\n{model} ({weights} weights, {passes}): batch 1, {result.settings['threads']} threads, {rounds} rounds, "
          f"TVM {'tuned, ' + str(tune_trials) + ' trials' if tune_trials else 'untuned'}")
    print(f"  file size: fp32 {sizes['fp32']:,} B, int8 {sizes['int8']:,} B ({sizes['fp32'] / sizes['int8']:.2f}x smaller)")
    for engine in result.settings["engines"]["x86"]:  # OpenVINO's two too where installed: the QDQ graph runs int8
        cells = []
        for candidate in ("fp32", "int8"):
            row = rows.get((candidate, engine), {})
            latency = (row.get("latency") or {}).get("median_ms")
            quality = row.get("accuracy", {}).get("top1") if row.get("accuracy") else None
            cells.append(f"{candidate} " + (f"{latency:.3f} ms" if latency else "not supported")
                         + (f" (top-1 {quality:.4f})" if quality is not None else ""))
        fp32_ms = (rows.get(("fp32", engine), {}).get("latency") or {}).get("median_ms")
        int8_ms = (rows.get(("int8", engine), {}).get("latency") or {}).get("median_ms")
        ratio = f"  int8/fp32 {int8_ms / fp32_ms:.3f}" if fp32_ms and int8_ms else ""
        print(f"  {engine.ljust(14)}" + "   ".join(cells) + ratio)
    fidelity = [r for r in result.rows if r["candidate"] == "int8" and r.get("fidelity")]
    for row in fidelity:
        f = row["fidelity"]
        print(f"  int8 fidelity to fp32 on {row['engine']}: top-1 agreement {f.get('top1_agreement')}, "
              f"max rel. error {f.get('max_rel_error'):.3g}")
    manifests = glob.glob(os.path.join(work, model, "**", "manifest.json"), recursive=True)
    for path in sorted(manifests):  # what each TVM build's tuning did (a task left untuned runs as plain loops)
        tuning = _read_json(path)["tuning"]
        print(f"  TVM {os.path.relpath(path, os.path.join(work, model)).split(os.sep)[0]}: "
              f"{tuning['trials_spent']} trials in {tuning['seconds']:.0f} s, {len(tuning['tasks'])} tasks, "
              f"{len(tuning['untuned'])} untuned")
    lowering = next((m["int8"] for m in map(_read_json, manifests) if m.get("int8")), None)
    print(f"  int8 pass: {len(report.passes[-1].changed)} layers quantized; TVM build: "
          + (f"{len(lowering['int8_ops'])} ops and {len(lowering['int8_kernels'])} kernels in int8, "
             f"{len(lowering['float_ops'])} left in float, "
             f"{len(lowering.get('tensorized_kernels') or [])} tensorized for {lowering.get('dot_product')}, "
             f"{lowering.get('network')} network"
             if lowering else "no int8 build found"))


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="digits,resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--tune-trials", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--passes", default="fold_bn", help="the pipeline before int8, for both candidates")
    parser.add_argument("--weights", choices=("random", "planted"), default="random")
    parser.add_argument("--work-dir", help="keep the artifacts and tuning logs here (default: a temp folder)")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    with tempfile.TemporaryDirectory(prefix="tensorfold-quantize-") as temp:
        work = args.work_dir or temp
        os.makedirs(work, exist_ok=True)
        for model in args.models.split(","):
            run(model.strip(), args.size, args.tune_trials, args.rounds, args.warmup, work, args.passes, args.weights)


if __name__ == "__main__":
    main()
