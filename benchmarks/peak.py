"""This CPU's measured fp32 GEMM peak: the roofline that achieved GFLOP/s are read against.

    python benchmarks/peak.py                      # one thread per physical core, as tf.measure uses
    python benchmarks/peak.py --threads 1 --sizes 2048

Large square matmuls with torch (oneDNN/MKL) and numpy (OpenBLAS), best of several repeats:
a vendor GEMM at these sizes is the fastest fp32 code this machine is known to run, so its
rate stands in for the peak (a datasheet figure assumes clocks and turbo we cannot check).

With the `openvino` extra installed it also measures OpenVINO's (oneDNN's) MatMul at
512 x 2048 x 2048 in fp32, bf16 (where the CPU has AVX512_BF16 / AMX) and int8 (u8 x s8 from a
QDQ graph): numpy's OpenBLAS may run AVX2 kernels on an AVX-512 CPU, and int8 / bf16 code must be
read against the int8 / bf16 rate, not the fp32 one. `peak_gflops` is the best fp32 figure of all.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

SIZES = (2048, 4096)


def _best_seconds(run, repeats: int) -> float:
    run()  # warm-up: thread pools, page faults, packing buffers
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def measure_peak_gflops(threads: int | None = None, sizes=SIZES, repeats: int = 5) -> dict:
    """fp32 GEMM GFLOP/s of torch and numpy at each size, and the best of them as `peak_gflops`."""
    from threadpoolctl import threadpool_limits

    from tensorfold.runtime.engines import default_threads
    from tensorfold.targets.registry import host_cpu

    threads = threads or default_threads()
    # another process on these cores halves the figure (seen: 90 instead of 200 GFLOP/s): say so
    load = round(os.getloadavg()[0], 2)
    rates: dict[str, float] = {}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n in sizes:
            flops = 2.0 * n ** 3
            # fewer repeats of the large size: one 4096^3 GEMM takes about a second on 2 cores
            count = max(2, repeats if n <= 2048 else repeats // 2)
            a, b = torch.randn(n, n), torch.randn(n, n)
            with torch.no_grad():
                rates[f"torch {n}^3"] = flops / _best_seconds(lambda: torch.mm(a, b), count) / 1e9
            x, y = a.numpy(), b.numpy()
            with threadpool_limits(limits=threads, user_api="blas"):
                rates[f"numpy {n}^3"] = flops / _best_seconds(lambda: np.matmul(x, y), count) / 1e9
    finally:
        torch.set_num_threads(previous)
    precisions = openvino_matmul_gops(threads, repeats=repeats)
    if "fp32" in precisions:
        rates["openvino 512x2048x2048"] = precisions["fp32"]
    best = max(rates, key=rates.get)
    return {"threads": threads, "peak_gflops": round(rates[best], 1), "best": best,
            "gflops": {name: round(rate, 1) for name, rate in rates.items()}, "load_average": load,
            "per_precision_gops": {name: round(rate, 1) for name, rate in precisions.items()},
            "cpu": host_cpu()}


def openvino_matmul_gops(threads: int, m: int = 512, k: int = 2048, n: int = 2048, repeats: int = 5) -> dict:
    """OpenVINO MatMul rate (G multiply-add pairs x 2 per second) per precision; {} without openvino.

    fp32 and bf16 come from one float graph compiled with INFERENCE_PRECISION_HINT f32 / bf16; int8
    from the QDQ form of the same matmul (u8 activations, s8 per-column weights), which OpenVINO's
    low-precision transformations run as an integer GEMM. bf16 is skipped where OpenVINO does not
    offer it on this CPU.
    """
    try:
        import openvino as ov
    except ImportError:
        return {}
    core = ov.Core()
    offered = [str(p) for p in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    rates = {}
    for name, model, hint in (("fp32", _matmul_onnx(weight, int8=False), "f32"),
                              ("bf16", _matmul_onnx(weight, int8=False), "bf16"),
                              ("int8", _matmul_onnx(weight, int8=True), None)):
        if name == "bf16" and "BF16" not in offered:
            continue
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": int(threads)}
        if hint:
            config["INFERENCE_PRECISION_HINT"] = hint
        compiled = core.compile_model(core.read_model(model), "CPU", config)
        request = compiled.create_infer_request()
        request.set_tensor(compiled.inputs[0], ov.Tensor(x))
        rates[name] = 2.0 * m * k * n / _best_seconds(request.infer, max(3, repeats * 4)) / 1e9
    return rates


def _matmul_onnx(weight: np.ndarray, int8: bool) -> bytes:
    """y = x @ W as ONNX; int8: x and W through QuantizeLinear / DequantizeLinear (per-column W scales).
    The weights take 7 bits ([-63, 63]): x86 without VNNI multiplies u8 x s8 with vpmaddubsw, whose 16-bit sum
    of two products saturates at full range (255 * 127 * 2 > 32767); the rate does not depend on the values."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k, n = weight.shape
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])]
    if not int8:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
        initializers = [numpy_helper.from_array(weight, "w")]
    else:
        w_scale = (np.abs(weight).max(axis=0) / 63).astype(np.float32)
        w_q = np.clip(np.round(weight / w_scale), -63, 63).astype(np.int8)
        initializers = [numpy_helper.from_array(w_q, "w_q"), numpy_helper.from_array(w_scale, "w_s"),
                        numpy_helper.from_array(np.zeros(n, np.int8), "w_z"),
                        numpy_helper.from_array(np.array(8.0 / 255, np.float32), "x_s"),
                        numpy_helper.from_array(np.array(128, np.uint8), "x_z")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["x_q"]),
                 helper.make_node("DequantizeLinear", ["x_q", "x_s", "x_z"], ["x_dq"]),
                 helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w_dq"], axis=1),
                 helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"])]
    graph = helper.make_graph(nodes, "matmul", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return model.SerializeToString()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="default: one per physical core")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--repeats", type=int, default=5)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    peak = measure_peak_gflops(args.threads, [int(s) for s in args.sizes.split(",")], args.repeats)
    from tensorfold.targets.registry import host_cpu

    print(f"CPU: {host_cpu()}")
    print(f"fp32 GEMM, {peak['threads']} thread(s), best of repeats (1-min load average before: "
          f"{peak['load_average']}; anything else running lowers the figure):")
    for name, rate in peak["gflops"].items():
        print(f"  {name:<24} {rate:8.1f} GFLOP/s")
    print(f"peak: {peak['peak_gflops']:.1f} GFLOP/s ({peak['best']})")
    if peak["per_precision_gops"]:
        print("OpenVINO (oneDNN) MatMul 512x2048x2048 per precision: " +
              ", ".join(f"{name} {rate:.0f} GOP/s" for name, rate in peak["per_precision_gops"].items()))
    else:
        print("per-precision peaks (fp32 / bf16 / int8) need the openvino extra: pip install -e \".[openvino]\"")


if __name__ == "__main__":
    main()
