"""bf16 against fp32, on a trained task: top-1 and latency of each, measured side by side in one run.

Builds the task's model (BatchNorm folded) for this host twice, `precision="fp32"` and `precision="bf16"`
(targets/bf16.py: the convs with whole input blocks on AMX-BF16 tiles, or with AVX512-BF16's vdpbf16ps),
each tuned with --trials MetaSchedule trials from its own database, then `tf.measure`s both on the task's test set with
onnxruntime and OpenVINO (its default precision, bf16 on such a CPU) beside them: 2 threads,
--rounds interleaved rounds. Needs an x86 CPU with AMX-BF16 (Intel Xeon Sapphire Rapids or later) or
AVX512-BF16 (AMD Zen 4 or later).

    python benchmarks/bf16.py --task resnet18-digits --trials 64
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import tensorfold as tf
from tensorfold.measure import Candidate
from tensorfold.models import resolve
from tensorfold.targets.registry import host_cpu

THREADS = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="resnet18-digits", help="a trained task (tensorfold tasks)")
    parser.add_argument("--trials", type=int, default=64, help="MetaSchedule trials per build")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--work-dir", help="keep artifacts and tuning databases here (default: a temp folder)")
    parser.add_argument("--json", help="write the measure report and the builds' figures here")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    work = args.work_dir or tempfile.mkdtemp(prefix="tensorfold-bf16-")
    folded, _ = tf.compress(resolve(args.task), "fold_bn")
    built = {}
    for precision in ("fp32", "bf16"):
        started = time.perf_counter()
        artifact = tf.build(folded, "x86", os.path.join(work, precision), tune_trials=args.trials,
                            tuning_db=os.path.join(work, f"tuning-{precision}"), precision=precision)
        tuning = artifact.manifest["tuning"]
        built[precision] = {"path": artifact.path, "seconds": round(time.perf_counter() - started, 1),
                            "tasks": len(tuning["tasks"]), "trials": tuning["trials_spent"],
                            "bf16": artifact.manifest["bf16"]}
        print(f"{precision}: built in {built[precision]['seconds']} s, {tuning['trials_spent']} trials over "
              f"{len(tuning['tasks'])} tasks" + (f"; {artifact.manifest['bf16']}" if precision == "bf16" else ""),
              flush=True)
    # the fp32 graph on every engine (TVM: its fp32 build), and the bf16 build on TVM alone
    candidates = [("fp32", Candidate("fp32", folded, {"x86": built["fp32"]["path"]})),
                  ("bf16", Candidate("bf16", None, {"x86": built["bf16"]["path"]}))]
    report = tf.measure(candidates, "x86", data=args.task, rounds=args.rounds, threads=THREADS,
                        engines=["onnxruntime", "openvino", "tvm"])
    print(f"\n{args.task}, {THREADS} threads, {args.rounds} interleaved rounds; TVM {args.trials} trials per build")
    print(f"CPU: {host_cpu()}\n")
    report.print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"task": args.task, "cpu": host_cpu(), "trials": args.trials, "builds": built,
                       "measure": report.to_json()}, f, indent=2, default=str)


if __name__ == "__main__":
    main()
