"""ResNet-18 and MobileNet-v2, batch 1, on x86: torch eager, onnxruntime, TVM untuned, TVM tuned and,
where the `openvino` extra is installed, OpenVINO in f32 and in its default precision (bf16 on CPUs
with AVX512_BF16: it may pass the fp32 peak), the original and a compressed variant; prints each
median, the ratios, and each engine's achieved GFLOP/s as a fraction of this CPU's measured fp32
GEMM peak (peak.py, same thread count).

    python benchmarks/engines.py --tune-trials 512 --rounds 30
    python benchmarks/engines.py --tune-trials 0 --rounds 3 --size 64 --models resnet18   # smoke run
    python benchmarks/engines.py --models resnet18 --passes "" --tune-trials 800 --tune-further 800

Random weights: EVBMF finds nothing to compress in them; `--weights planted` gives every conv the
low-rank structure trained weights have (as decompose.py does), or `--passes "fold_bn,
tucker2(ratio=3)"` a variant that changes the cost whatever the weights.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
import torchvision
from decompose import planted_graph
from peak import measure_peak_gflops

import tensorfold as tf
from tensorfold.models import resolve
from tensorfold.runtime.engines import default_threads


def run(arch: str, size: int, passes: str, tune_trials: int, rounds: int, warmup: int, work: str, peak: dict,
        further: int = 0, weights: str = "random") -> None:
    if weights == "planted":  # low-rank structure for EVBMF to find (decompose.py); latency is weight-blind
        graph = planted_graph(arch, size)
    else:
        graph = resolve(f"torchvision:{arch}", (1, 3, size, size))
    candidates = {"original": graph}
    if passes:  # --passes "" measures the original alone (half the tuning time)
        candidates["compressed"], _ = tf.compress(graph, passes)
    # untuned means no schedule at all: an empty database, not the one the tuned build fills (or reuses)
    tuning_dir = os.environ.get("TENSORFOLD_TUNING_DIR")
    os.environ["TENSORFOLD_TUNING_DIR"] = f"{work}/no-tuning"
    try:
        report = tf.measure(candidates, "x86", rounds=rounds, warmup=warmup, tune_trials=0,
                            work_dir=f"{work}/untuned", random_samples=2, progress=False)
    finally:
        if tuning_dir is None:
            del os.environ["TENSORFOLD_TUNING_DIR"]
        else:
            os.environ["TENSORFOLD_TUNING_DIR"] = tuning_dir
    medians = {(r["candidate"], r["engine"]): r["latency"]["median_ms"] for r in report.rows if r.get("latency")}
    if tune_trials or further:
        tuned_work = f"{work}/tuned"
        if further:  # first the usual budget, then `further` trials over every task, tuned ones too
            if tune_trials:
                _tune_first(candidates, tune_trials, f"{work}/first")
            _tune_first(candidates, further, tuned_work, tune_further=True)
            tune_trials = tune_trials + further
        tuned = tf.measure(candidates, "x86", rounds=rounds, warmup=warmup, tune_trials=tune_trials,
                           work_dir=f"{work}/measured", random_samples=2, progress=True)
        medians.update({(r["candidate"], "tvm-tuned"): r["latency"]["median_ms"] for r in tuned.rows
                        if r["engine"] == "tvm" and r.get("latency")})
    print(f"\n{arch} at {size}x{size}, batch 1, {report.settings['threads']} threads, {rounds} rounds; "
          f"variant: {passes}")
    # tf.measure's x86 engines: torch, onnxruntime, tvm, and openvino-fp32 / openvino when installed
    engines = report.settings["engines"]["x86"] + (["tvm-tuned"] if tune_trials else [])
    precision = next((r["precision"] for r in report.rows if r["engine"] == "openvino" and r.get("precision")), None)
    if precision:
        print(f"  openvino: OpenVINO's default precision on this CPU, {precision}")
    for candidate in candidates:
        print("  " + candidate.ljust(11) + "  ".join(f"{e} {medians.get((candidate, e), float('nan')):.3f} ms"
                                                      for e in engines))
    for engine in engines if "compressed" in candidates else []:
        ratio = medians.get(("compressed", engine), float("nan")) / medians.get(("original", engine), float("nan"))
        print(f"  compressed / original on {engine}: {ratio:.3f}")
    if tune_trials:
        for candidate in candidates:
            tuned_ms = medians[(candidate, "tvm-tuned")]
            print(f"  {candidate}: " + ", ".join(f"TVM tuned / {e}: {tuned_ms / medians[(candidate, e)]:.3f}"
                                                 for e in engines if e not in ("tvm", "tvm-tuned")
                                                 and (candidate, e) in medians))
        if further and os.path.isdir(f"{work}/first"):
            _print_tuning(f"{work}/first", candidates)
        _print_tuning(tuned_work if further else f"{work}/measured", candidates)
    print(f"  achieved GFLOP/s (% of the {peak['peak_gflops']:.1f} GFLOP/s fp32 GEMM peak, {peak['threads']} threads); "
          "FLOPs of the conv/linear/batch-norm layers, 2 per multiply-add:")
    for candidate, candidate_graph in candidates.items():
        flops = candidate_graph.layer_cost().flops
        rates = {e: flops / (medians.get((candidate, e), float("nan")) * 1e-3) / 1e9 for e in engines}
        print("  " + candidate.ljust(11) + f"{flops / 1e9:.3f} GFLOP  "
              + "  ".join(f"{e} {rate:.1f} ({100 * rate / peak['peak_gflops']:.0f}%)" for e, rate in rates.items()))


def _tune_first(candidates: dict, trials: int, work: str, tune_further: bool = False) -> None:
    """Build each candidate with `trials` into the database the measured build then applies."""
    for candidate, graph in candidates.items():
        tf.build(graph, "x86", os.path.join(work, candidate, _x86_key()), tune_trials=trials, tune_further=tune_further)


def _x86_key() -> str:
    from tensorfold.targets import get_target

    return get_target("x86").key


def _print_tuning(work: str, candidates: dict) -> None:
    """Budget, time and untuned tasks of each tuned build, and the tasks that take most of its time."""
    from tensorfold.targets.tuning.profile import top_tasks

    for candidate in candidates:
        # where tf.measure builds a candidate: <work_dir>/<candidate>/<target key>
        with open(os.path.join(work, candidate, _x86_key(), "manifest.json")) as f:
            tuning = json.load(f)["tuning"]
        print(f"  {candidate}: tuning {tuning['trials_spent']} of {tuning['budget']} trials in {tuning['seconds']} s; "
              f"{len(tuning['untuned'])} of {len(tuning['tasks'])} tasks untuned; largest tasks:")
        for line in top_tasks(tuning["task_profile"], 3):
            print(f"    {line}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,mobilenet_v2")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--passes", default="fold_bn, tucker2(rank=evbmf)",
                        help='the compressed variant ("" for the original alone)')
    parser.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule budget for the tuned TVM build")
    parser.add_argument("--tune-further", type=int, default=0, metavar="N",
                        help="after --tune-trials, N more trials over every task, tuned ones too")
    parser.add_argument("--weights", choices=("random", "planted"), default="random",
                        help="planted: low-rank + 1%% noise weights (decompose.py), for the EVBMF variant to act on")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    # the roofline first, on the thread count tf.measure will use, while nothing else runs
    peak = measure_peak_gflops(default_threads())
    print(f"fp32 GEMM peak: {peak['peak_gflops']:.1f} GFLOP/s ({peak['best']}, {peak['threads']} threads)")
    with tempfile.TemporaryDirectory(prefix="tensorfold-bench-") as work:
        for arch in args.models.split(","):
            run(arch.strip(), args.size, args.passes, args.tune_trials, args.rounds, args.warmup, work, peak,
                args.tune_further, args.weights)


if __name__ == "__main__":
    main()
