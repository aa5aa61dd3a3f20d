"""What each int8 lowering of TVM buys on this CPU, on one conv block or ResNet-18, beside onnxruntime and OpenVINO.

The block is conv3x3 -> relu -> conv3x3 (C -> C channels, S x S, batch 1): small enough to tune in
minutes, large enough that the convolutions dominate; `--model resnet18` takes torchvision's ResNet-18
(`--model mobilenet_v2` its MobileNet-v2; random weights, calibrated on 4 random-normal batches). It is built for x86 five ways, each tuned with
--trials MetaSchedule trials from its own database (in --tuning-dir, reused; --further spends the trials
again on every task): fp32 (convs in the blocked NCHW16c layout, the default on x86, targets/float_layout.py);
fp32-nchw (convs as imported); bf16 (`precision="bf16"`: the blocked convs in bf16, on AMX-BF16 tiles or with AVX512-BF16's vdpbf16ps); int8 with `int8_network="nchw"` (no blocked layout: LLVM's vectoriser widens
the bytes); "per-conv" (each conv in the CPU's blocked dot-product layout, VNNI `vpdpbusd`,
AVX2 `vpmaddwd` on s16 or AArch64 `sdot`); and "blocked" (activations kept blocked between convs,
fixed-point requantization; the default where the CPU has VNNI or AMX). onnxruntime and OpenVINO run the same fp32 and QDQ int8 ONNX files. All
engines are timed interleaved in one run (2 threads, a pause between runners); the table gives the
median, GOP/s of the two convolutions, and the ratio to onnxruntime fp32.

    python benchmarks/int8_layouts.py --trials 48
    python benchmarks/int8_layouts.py --trials 200 --further --tuning-dir /tmp/int8-layouts   # tune more
    python benchmarks/int8_layouts.py --model resnet18 --size 224 --builds per-conv,blocked --trials 150
    python benchmarks/int8_layouts.py --model resnet18 --size 224 --weights planted \
        --passes "fold_bn, tucker2(rank=evbmf)" --builds per-conv --trials 300     # factorized, then int8

The GOP/s column counts the convs of the model as given (before --passes; for a factorized model, read
it as the original's work per second). --calls 5 --pause 0 times the steady state (5 calls back to back
per round). --builds picks among fp32, fp32-nchw, bf16, nchw, per-conv and blocked (an empty --builds times --extra only);
--extra NAME=DIR times artifacts built before (e.g. by another version of tensorfold) in the same run;
with fp32 / bf16 builds alone (and no --extra) the model is not quantized and no int8 engine runs;
--json writes the table as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

import tensorfold as tf
from tensorfold.runtime.tvm_engine import prepare_local
from tensorfold.targets.registry import host_cpu

THREADS = 2
BUILDS = ("fp32", "fp32-nchw", "bf16", "nchw", "per-conv", "blocked")
FLOAT_BUILDS = ("fp32", "fp32-nchw", "bf16")  # built from the fp32 graph


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("block", "resnet18", "mobilenet_v2"), default="block")
    parser.add_argument("--builds", default=",".join(BUILDS), help=f"TVM builds among {', '.join(BUILDS)}")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=DIR",
                        help="also time this artifact folder (built earlier) under NAME")
    parser.add_argument("--passes", default="fold_bn", help="torchvision models: the pipeline before int8")
    parser.add_argument("--weights", choices=("random", "planted"), default="random", help="torchvision models' weights")
    parser.add_argument("--trials", type=int, default=48, help="MetaSchedule trials per TVM build")
    parser.add_argument("--further", action="store_true", help="spend --trials again on tasks already tuned")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=56)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=1,
                        help="consecutive calls per engine and round (their median counts): > 1 for the steady state")
    parser.add_argument("--pause", type=float, default=0.1, help="seconds between engines")
    parser.add_argument("--tuning-dir", help="databases (one per build) are kept here; default: a temp folder")
    parser.add_argument("--work-dir", help="keep the artifacts here (default: a temp folder)")
    parser.add_argument("--json", help="write the results here")
    return parser


def block_graphs(channels: int, size: int, with_int8: bool = True):
    """(torch module, fp32 graph, int8 QDQ graph or None, an input) for conv3x3 -> relu -> conv3x3, calibrated
    on uniform [0, 1)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(channels, channels, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(channels, channels, 3, padding=1)).eval()
    graph = tf.capture(net, torch.zeros(1, channels, size, size))
    rng = np.random.default_rng(0)
    calibration = [rng.random((1, channels, size, size), dtype=np.float32) for _ in range(4)]
    int8 = tf.compress(graph, "int8", calibration=calibration)[0] if with_int8 else None
    return net, graph, int8, calibration[0]


def torchvision_graphs(arch: str, size: int, passes: str = "fold_bn", planted: bool = False, with_int8: bool = True):
    """(torch module, fp32 graph after `passes`, int8 QDQ graph or None, an input) for torchvision's `arch`, random
    weights (planted: each conv given the low-rank structure of decompose.py, so EVBMF has ranks to find)."""
    import torchvision

    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)(weights=None).eval()
    if planted:
        from decompose import plant_low_rank

        plant_low_rank(net)
    graph, _ = tf.compress(tf.capture(net, torch.zeros(1, 3, size, size)), passes)
    rng = np.random.default_rng(0)
    calibration = [rng.standard_normal((4, 3, size, size)).astype(np.float32) for _ in range(4)]
    int8 = tf.compress(graph, "int8", calibration=calibration)[0] if with_int8 else None
    return net, graph, int8, calibration[0][:1]


def conv_gops(module: torch.nn.Module, x: np.ndarray) -> float:
    """Multiply-adds x 2 of the convs and linears of `module` on `x`."""
    macs = 0

    def count(module, _, out):
        nonlocal macs
        if isinstance(module, torch.nn.Conv2d):
            macs += out.numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, torch.nn.Linear):
            macs += out.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in module.modules()]
    with torch.no_grad():
        module(torch.from_numpy(x))
    for hook in hooks:
        hook.remove()
    return 2 * macs / 1e9


def _onnx_runners(graph, int8, x, work: str, original=None) -> dict:
    """onnxruntime and OpenVINO on the fp32 and int8 graphs (and on `original`, the model before --passes)."""
    import onnxruntime as ort

    runners = {}
    graphs = [("fp32", graph), ("int8", int8)] + ([("fp32 original", original)] if original is not None else [])
    for name, g in graphs:
        if g is None:
            continue
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
        if name.startswith("fp32"):  # and in f32, the precision TVM's fp32 builds compute in
            request = ov.Core().compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY",
                                                           "INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
            runners[f"OpenVINO {name} (f32)"] = lambda r=request: r.infer({0: x})
    return runners


def main() -> None:
    args = build_parser().parse_args()
    work = args.work_dir or tempfile.mkdtemp(prefix="tensorfold-int8-layouts-")
    os.makedirs(work, exist_ok=True)
    tuning_dir = args.tuning_dir or os.path.join(work, "tuning")
    builds = [b.strip() for b in args.builds.split(",") if b.strip()]
    unknown = sorted(set(builds) - set(BUILDS))
    if unknown:
        raise SystemExit(f"--builds: unknown {', '.join(unknown)}; choose among {', '.join(BUILDS)}")
    with_int8 = bool(args.extra) or any(b not in FLOAT_BUILDS for b in builds)  # float builds alone: no int8 engines
    if args.model != "block":
        net, graph, int8, x = torchvision_graphs(args.model, args.size, args.passes, args.weights == "planted",
                                                 with_int8)
        what = f"{args.model} ({args.weights} weights, {args.passes}), {args.size}x{args.size}, batch 1"
    else:
        net, graph, int8, x = block_graphs(args.channels, args.size, with_int8)
        what = f"conv3x3 -> relu -> conv3x3, {args.channels} channels, {args.size}x{args.size}, batch 1"
    gops = conv_gops(net, x)
    original = None
    if args.model != "block" and args.passes.replace(" ", "") != "fold_bn":
        original, _ = tf.compress(tf.capture(net, torch.zeros(1, 3, args.size, args.size)), "fold_bn")
    runners = _onnx_runners(graph, int8, x, work, original)
    tunings = {}
    for build in builds:
        name, g = (f"TVM {build}", graph) if build in FLOAT_BUILDS else (f"TVM int8 {build}", int8)
        started = time.perf_counter()
        key = name.replace(" ", "-")
        built = tf.build(g, "x86", os.path.join(work, key), tune_trials=args.trials, tune_further=args.further,
                         tuning_db=os.path.join(tuning_dir, key), progress=False,
                         int8_network="per-conv" if build in FLOAT_BUILDS else build,
                         float_network="nchw" if build == "fp32-nchw" else "auto",
                         precision="bf16" if build == "bf16" else "fp32")
        lowered = built.manifest.get("int8") or {}
        tuning = built.manifest["tuning"]
        tunings[name] = {"trials": tuning["trials_spent"], "tasks": len(tuning["tasks"]),
                         "fixed_schedules": len(tuning.get("fixed", [])), "untuned": len(tuning["untuned"]),
                         "tuning_seconds": tuning["seconds"]}
        print(f"{name}: built in {time.perf_counter() - started:.0f} s, {tuning['trials_spent']} trials over "
              f"{len(tuning['tasks'])} tasks ({len(tuning['untuned'])} untuned), {len(tuning.get('fixed', []))} "
              f"data-movement kernels with a fixed schedule; dot product {lowered.get('dot_product')}; tensorized "
              f"{len(lowered.get('tensorized_kernels', []))}", flush=True)
        if built.manifest.get("bf16"):
            bf16 = built.manifest["bf16"]
            tunings[name]["bf16"] = bf16
            print(f"{name}: {bf16['convs']} convs in bf16 ({bf16['route']}, {bf16['instructions']}), "
                  f"{bf16['fp32_convs']} fp32; output error against fp32 {bf16['error']}", flush=True)
        runner = prepare_local(built.path, THREADS)
        runners[name] = lambda r=runner: r({r.input_names[0]: x})
    for extra in args.extra:
        name, _, path = extra.partition("=")
        runner = prepare_local(path, THREADS)
        runners[name] = lambda r=runner: r({r.input_names[0]: x})

    times = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            time.sleep(args.pause)  # the previous engine's spinning threads settle
            calls = []
            for _ in range(args.calls):
                started = time.perf_counter()
                run()
                calls.append(time.perf_counter() - started)
            times[name].append(float(np.median(calls)))
    if not args.rounds:
        return
    base = np.median(times["onnxruntime fp32"])
    print(f"\n{what}, {THREADS} threads; "
          + (f"TVM {args.trials} trials per build{' (further)' if args.further else ''}; " if builds
             else "TVM: the --extra artifacts; ")
          + f"{args.rounds} interleaved rounds of {args.calls} call(s) after a {args.pause:g} s pause")
    print(f"CPU: {host_cpu()}\n")
    print("| engine | median | GOP/s | vs onnxruntime fp32 |\n| --- | --- | --- | --- |")
    rows = []
    for name, values in times.items():
        ms = float(np.median(values)) * 1e3
        rows.append({"engine": name, "median_ms": round(ms, 4), "gops": round(gops / ms * 1e3, 1),
                     "vs_onnxruntime_fp32": round(base * 1e3 / ms, 3), **tunings.get(name, {})})
        print(f"| {name} | {ms:.2f} ms | {gops / ms * 1e3:.0f} | {base * 1e3 / ms:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": what, "cpu": host_cpu(), "threads": THREADS, "trials": args.trials,
                       "rounds": args.rounds, "calls": args.calls, "pause_s": args.pause, "conv_gop": round(gops, 4), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
