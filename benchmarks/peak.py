"""This CPU's measured fp32 GEMM peak: the roofline that achieved GFLOP/s are read against.

    python benchmarks/peak.py                      # one thread per physical core, as tf.measure uses
    python benchmarks/peak.py --threads 1 --sizes 2048

Large square matmuls with torch (oneDNN/MKL) and numpy (OpenBLAS), best of several repeats:
a vendor GEMM at these sizes is the fastest fp32 code this machine is known to run, so its
rate stands in for the peak (a datasheet figure assumes clocks and turbo we cannot check).
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
    best = max(rates, key=rates.get)
    return {"threads": threads, "peak_gflops": round(rates[best], 1), "best": best,
            "gflops": {name: round(rate, 1) for name, rate in rates.items()}, "load_average": load}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="default: one per physical core")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--repeats", type=int, default=5)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    peak = measure_peak_gflops(args.threads, [int(s) for s in args.sizes.split(",")], args.repeats)
    print(f"fp32 GEMM, {peak['threads']} thread(s), best of repeats (1-min load average before: "
          f"{peak['load_average']}; anything else running lowers the figure):")
    for name, rate in peak["gflops"].items():
        print(f"  {name:<12} {rate:8.1f} GFLOP/s")
    print(f"peak: {peak['peak_gflops']:.1f} GFLOP/s ({peak['best']})")


if __name__ == "__main__":
    main()
