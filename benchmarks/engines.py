"""ResNet-18 and MobileNet-v2, batch 1, on x86: torch eager, onnxruntime, TVM untuned, TVM tuned,
the original and a compressed variant; prints each median and the ratios.

    python benchmarks/engines.py --tune-trials 512 --rounds 30
    python benchmarks/engines.py --tune-trials 0 --rounds 3 --size 64 --models resnet18   # smoke run

Random weights: EVBMF finds little to compress in them, so `--passes "fold_bn, tucker2(ratio=3)"`
gives a variant that actually changes the cost.
"""
from __future__ import annotations

import argparse
import tempfile

import tensorfold as tf
from tensorfold.models import resolve


def run(arch: str, size: int, passes: str, tune_trials: int, rounds: int, warmup: int, work: str) -> None:
    graph = resolve(f"torchvision:{arch}", (1, 3, size, size))
    compressed, _ = tf.compress(graph, passes)
    candidates = {"original": graph, "compressed": compressed}
    report = tf.measure(candidates, "x86", rounds=rounds, warmup=warmup, tune_trials=0, work_dir=f"{work}/untuned",
                        random_samples=2, progress=False)
    medians = {(r["candidate"], r["engine"]): r["latency"]["median_ms"] for r in report.rows if r.get("latency")}
    if tune_trials:
        tuned = tf.measure(candidates, "x86", rounds=rounds, warmup=warmup, tune_trials=tune_trials,
                           work_dir=f"{work}/tuned", random_samples=2, progress=True)
        medians.update({(r["candidate"], "tvm-tuned"): r["latency"]["median_ms"] for r in tuned.rows
                        if r["engine"] == "tvm" and r.get("latency")})
    print(f"\n{arch} at {size}x{size}, batch 1, {report.settings['threads']} threads, {rounds} rounds; "
          f"variant: {passes}")
    engines = ["torch", "onnxruntime", "tvm"] + (["tvm-tuned"] if tune_trials else [])
    for candidate in candidates:
        print("  " + candidate.ljust(11) + "  ".join(f"{e} {medians.get((candidate, e), float('nan')):.3f} ms"
                                                      for e in engines))
    for engine in engines:
        ratio = medians.get(("compressed", engine), float("nan")) / medians.get(("original", engine), float("nan"))
        print(f"  compressed / original on {engine}: {ratio:.3f}")
    if tune_trials:
        for candidate in candidates:
            ratio = medians[(candidate, "tvm-tuned")] / medians[(candidate, "onnxruntime")]
            print(f"  {candidate}: TVM tuned / onnxruntime: {ratio:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,mobilenet_v2")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--passes", default="fold_bn, tucker2(rank=evbmf)")
    parser.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule budget for the tuned TVM build")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tensorfold-bench-") as work:
        for arch in args.models.split(","):
            run(arch.strip(), args.size, args.passes, args.tune_trials, args.rounds, args.warmup, work)


if __name__ == "__main__":
    main()
