"""What each int8 lowering of TVM buys on this CPU, on one conv block, beside onnxruntime and OpenVINO.

The block is conv3x3 -> relu -> conv3x3 (C -> C channels, S x S, batch 1): small enough to tune in
minutes, large enough that the convolutions dominate. It is built for x86 four ways, each tuned with
--trials MetaSchedule trials from its own database (in --tuning-dir, reused; --further spends the trials
again on every task): fp32; int8 with `int8_network="nchw"` (no blocked layout: LLVM's vectoriser widens
the bytes); "per-conv" (the default: each conv in the CPU's blocked dot-product layout, VNNI `vpdpbusd`,
AVX2 `vpmaddwd` on s16 or AArch64 `sdot`); and "blocked" (activations kept blocked between convs,
fixed-point requantization). onnxruntime and OpenVINO run the same fp32 and QDQ int8 ONNX files. All
engines are timed interleaved in one run (2 threads, a pause between runners); the table gives the
median, GOP/s of the two convolutions, and the ratio to onnxruntime fp32.

    python benchmarks/int8_layouts.py --trials 48
    python benchmarks/int8_layouts.py --trials 200 --further --tuning-dir /tmp/int8-layouts   # tune more
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

import tensorfold as tf
from tensorfold.runtime.tvm_engine import prepare_local
from tensorfold.targets.registry import host_cpu

THREADS = 2
LOWERINGS = ("nchw", "per-conv", "blocked")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=48, help="MetaSchedule trials per TVM build")
    parser.add_argument("--further", action="store_true", help="spend --trials again on tasks already tuned")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=56)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--tuning-dir", help="databases (one per build) are kept here; default: a temp folder")
    return parser


def block_graphs(channels: int, size: int):
    """(fp32 graph, int8 QDQ graph, an input) for conv3x3 -> relu -> conv3x3, calibrated on uniform [0, 1)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(channels, channels, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(channels, channels, 3, padding=1)).eval()
    graph = tf.capture(net, torch.zeros(1, channels, size, size))
    rng = np.random.default_rng(0)
    calibration = [rng.random((1, channels, size, size), dtype=np.float32) for _ in range(4)]
    int8, _ = tf.compress(graph, "int8", calibration=calibration)
    return graph, int8, calibration[0]


def _onnx_runners(graph, int8, x, work: str) -> dict:
    import onnxruntime as ort

    runners = {}
    for name, g in (("fp32", graph), ("int8", int8)):
        path = os.path.join(work, f"{name}.onnx")
        g.save(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x}
        runners[f"onnxruntime {name}"] = lambda s=session, f=feed: s.run(None, f)
        try:
            import openvino as ov
        except ImportError:
            continue
        request = ov.Core().compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": THREADS,
                                                       "PERFORMANCE_HINT": "LATENCY"}).create_infer_request()
        runners[f"OpenVINO {name} (default precision)"] = lambda r=request: r.infer({0: x})
    return runners


def main() -> None:
    args = build_parser().parse_args()
    work = tempfile.mkdtemp(prefix="tensorfold-int8-layouts-")
    tuning_dir = args.tuning_dir or os.path.join(work, "tuning")
    graph, int8, x = block_graphs(args.channels, args.size)
    runners = _onnx_runners(graph, int8, x, work)
    builds = [("TVM fp32", graph, "per-conv")] + [(f"TVM int8 {lowering}", int8, lowering) for lowering in LOWERINGS]
    for name, g, lowering in builds:
        started = time.perf_counter()
        key = name.replace(" ", "-")
        built = tf.build(g, "x86", os.path.join(work, key), tune_trials=args.trials, tune_further=args.further,
                         tuning_db=os.path.join(tuning_dir, key), progress=False, int8_network=lowering)
        lowered = built.manifest.get("int8") or {}
        print(f"{name}: built in {time.perf_counter() - started:.0f} s, {built.manifest['tuning']['trials_spent']} "
              f"trials; dot product {lowered.get('dot_product')}; tensorized {len(lowered.get('tensorized_kernels', []))}",
              flush=True)
        runner = prepare_local(built.path, THREADS)
        runners[name] = lambda r=runner: r({r.input_names[0]: x})

    times = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            time.sleep(0.1)  # the previous engine's spinning threads settle
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    gops = 2 * 2 * args.channels ** 2 * 9 * args.size ** 2 / 1e9  # two convs, a multiply-add = 2 ops
    base = np.median(times["onnxruntime fp32"])
    print(f"\nconv3x3 -> relu -> conv3x3, {args.channels} channels, {args.size}x{args.size}, batch 1, {THREADS} threads; "
          f"TVM {args.trials} trials per build{' (further)' if args.further else ''}; {args.rounds} interleaved rounds")
    print(f"CPU: {host_cpu()}\n")
    print("| engine | median | GOP/s | vs onnxruntime fp32 |\n| --- | --- | --- | --- |")
    for name, values in times.items():
        ms = float(np.median(values)) * 1e3
        print(f"| {name} | {ms:.2f} ms | {gops / ms * 1e3:.0f} | {base * 1e3 / ms:.2f}x |")


if __name__ == "__main__":
    main()
